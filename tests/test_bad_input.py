"""Bad input through the CLI, the converter and the API: a clear error naming the problem,
never a traceback, and nothing silently wrong (issue 12, section 4)."""

import json
import math
import re
import struct
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

import mlx_gemma3n
from mlx_gemma3n import PromptCache, SamplingOptions, user_message
from mlx_gemma3n.audio.io import AudioError
from mlx_gemma3n.cli import main as cli_main
from mlx_gemma3n.demo import build_demo_checkpoint
from mlx_gemma3n.file_tensors import find_tensors
from mlx_gemma3n.loading import CheckpointError, load_model
from mlx_gemma3n.tiny import TINY_CONFIG
from mlx_gemma3n.vision.processor import load_image


@pytest.fixture(scope="module")
def loaded(tiny_hf):
    return mlx_gemma3n.load(str(tiny_hf[0]))


def cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


# -- sampling options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["--seed", "-1"], "seed must be an integer in [0, 2**64), got -1"),
        (["--seed", str(2**70)], f"seed must be an integer in [0, 2**64), got {2**70}"),
        (["--temp", "inf"], "temperature must be >= 0, got inf"),
        (["--top-p", "nan"], "top_p must be in (0, 1], got nan"),
        (["--repetition-penalty", "inf"], "repetition_penalty must be > 0, got inf"),
    ],
)
def test_cli_refuses_bad_sampling_values(capsys, args, message):
    assert message in cli_error(["--model", "/nonexistent/model", "--prompt", "hi", *args], capsys)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"temperature": math.inf}, "temperature must be >= 0"),
        ({"min_p": -math.inf}, "min_p must be in [0, 1)"),
        ({"temperature": "hot"}, "temperature must be >= 0, got 'hot'"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_sampling_options_refuse_non_finite_and_wrong_types(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingOptions(**options).validate()


def test_seeded_sampling_is_reproducible_on_any_thread_and_unaffected_by_other_draws(loaded):
    def sample():
        responses = mlx_gemma3n.stream_generate(*loaded, "the cat", max_tokens=12, sampling=SamplingOptions(temperature=1.0, seed=5))
        return [r.token for r in responses]

    first = sample()
    mx.random.normal((3,))  # draws of the caller's thread must not matter
    assert sample() == first


# -- config.json -----------------------------------------------------------------------------


def bad_config(tmp_path, content) -> str:
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(content))
    return str(path)


def with_text(**changes):
    config = json.loads(json.dumps(TINY_CONFIG))
    config["text_config"].update(changes)
    return config


@pytest.mark.parametrize(
    "content,message",
    [
        ([TINY_CONFIG], "config.json must hold a JSON object, got a list"),
        (with_text(hidden_size="64"), "text_config.hidden_size must be an integer, got '64'"),
        (with_text(num_attention_heads=0), "text_config.num_attention_heads must be >= 1, got 0"),
        (with_text(rms_norm_eps=float("nan")), "text_config.rms_norm_eps must be a finite number, got nan"),
        (with_text(intermediate_size=[96] * 6 + ["x"]), "text_config.intermediate_size must be a list of positive integers"),
        ({**TINY_CONFIG, "image_token_id": None}, "image_token_id must be an integer >= 0, got None"),
        ({**TINY_CONFIG, "audio_config": [1]}, "audio_config must be a JSON object or null"),
    ],
)
def test_malformed_config_in_cli_and_converter(tmp_path, capsys, content, message):
    path = bad_config(tmp_path, content)
    assert message in cli_error(["--model", path, "--prompt", "hi"], capsys)
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "convert", "--hf-path", path, "--mlx-path", str(out)], capture_output=True, text=True
    )
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


# -- prompts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt,message",
    [
        (None, "prompt must be a string or a list of chat messages, got NoneType"),
        ("lone \ud83d surrogate", r"lone surrogate '\\ud83d' at position 5"),
        ([{"role": "user"}], "message 0 \\(user\\) needs 'content'"),
        ([{"role": "user", "content": [{"type": "text"}]}], "a text item needs a 'text' entry"),
        ([{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}], "content items must be dicts of type"),
        (["hello"], "message 0 must be a dict with a string 'role'"),
    ],
)
def test_malformed_prompts_are_named(loaded, prompt, message):
    with pytest.raises(ValueError, match=message):
        mlx_gemma3n.generate(*loaded, prompt, max_tokens=1)


def test_max_tokens_of_the_wrong_type(loaded):
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1, got '5'"):
        mlx_gemma3n.generate(*loaded, "hi", max_tokens="5")


# -- audio -----------------------------------------------------------------------------------


@pytest.mark.parametrize("samples", [1, 100, 512])
def test_audio_shorter_than_one_frame(loaded, samples):
    clip = (np.full(samples, 0.1, np.float32), 16000)
    with pytest.raises(AudioError, match=f"audio array is {samples / 16:.1f} ms long, shorter than one analysis frame"):
        loaded[1]([user_message("hi", audio=[clip])])


def test_shortest_audio_clip_runs(loaded):
    clip = (np.full(513, 0.1, np.float32), 16000)
    responses = list(mlx_gemma3n.stream_generate(*loaded, [user_message("hi", audio=[clip])], max_tokens=2))
    assert responses[0].prompt_tokens > 188 and responses[-1].finish_reason in ("stop", "length")


def test_sub_frame_remnant_after_the_last_cut_is_dropped(loaded):
    silence = np.zeros(30 * 16000 + 100, np.float32)  # the cut falls in the last 30 ms window
    segments = loaded[1].audio_segments((silence, 16000))
    assert len(segments) == 1 and len(silence) - len(segments[0]) <= 512


# -- images ----------------------------------------------------------------------------------


def test_16_bit_grayscale_png_is_scaled_to_8_bits(tmp_path):
    gradient = np.linspace(0, 65535, 64 * 256).reshape(64, 256).astype(np.uint16)
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = np.asarray(load_image(tmp_path / "g16.png"))
    expected = np.rint(gradient / 257.0).astype(np.uint8)
    assert rgb.shape == (64, 256, 3) and np.abs(rgb[..., 0].astype(int) - expected).max() == 0
    assert (rgb[..., 0] == rgb[..., 2]).all() and abs(rgb.mean() - 127.5) < 1


# -- safetensors layout ----------------------------------------------------------------------


def rewrite_offsets(file, name, offsets) -> None:
    """Point `name`'s data_offsets elsewhere, keeping the file's data as it is."""
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header[name]["data_offsets"] = offsets
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def two_tensor_file(tmp_path):
    file = tmp_path / "t.safetensors"
    save_file({"a": np.zeros((4, 8), np.float32), "b": np.ones((4, 8), np.float32)}, str(file))
    return file


@pytest.mark.parametrize(
    "name,offsets,message",
    [("a", [128, 256], "tensors a and b overlap"), ("b", [132, 260], "a gap of 4 bytes before tensor b")],
)
def test_row_reader_refuses_aliased_or_gapped_offsets(tmp_path, name, offsets, message):
    file = tmp_path / "t.safetensors"  # a: bytes [0, 128), b: [128, 256)
    save_file({"a": np.zeros((4, 8), np.float32), "b": np.ones((4, 8), np.float32)}, str(file))
    rewrite_offsets(file, name, offsets)
    with pytest.raises(ValueError, match=message):
        find_tensors([file], ["a"])


def test_checkpoint_with_aliased_tensor_is_refused(tiny_hf, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_hf[0], ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    file = ckpt / index["model.language_model.layers.1.mlp.up_proj.weight"]
    n = struct.unpack("<Q", file.read_bytes()[:8])[0]
    header = json.loads(file.read_bytes()[8 : 8 + n])
    victim = "model.language_model.layers.1.mlp.up_proj.weight"
    source = next(k for k, v in header.items() if k != victim and k != "__metadata__" and v["shape"] == header[victim]["shape"] and v["dtype"] == header[victim]["dtype"])
    rewrite_offsets(file, victim, header[source]["data_offsets"])
    with pytest.raises(CheckpointError, match="tensors .* overlap"):
        load_model(ckpt)


def test_prompt_cache_with_aliased_tensor_is_refused(loaded, tmp_path):
    cache = PromptCache.new(loaded[0])
    list(mlx_gemma3n.stream_generate(*loaded, "hi", max_tokens=2, prompt_cache=cache))
    file = tmp_path / "c.safetensors"
    cache.save(file)
    n = struct.unpack("<Q", file.read_bytes()[:8])[0]
    header = json.loads(file.read_bytes()[8 : 8 + n])
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[:2]
    rewrite_offsets(file, second, header[first]["data_offsets"])
    with pytest.raises(ValueError, match="tensors .* overlap"):
        PromptCache.load(file)


# -- the demo model --------------------------------------------------------------------------


def test_demo_has_no_constant_tensor_and_its_image_matters(tmp_path):
    """Every tensor is random (282 of the vision tower's were zeros, so images changed nothing),
    and two images give different logits (128x128 pixels: the tower's output is 16x16 still)."""
    path = build_demo_checkpoint(tmp_path / "demo")
    for file in path.glob("*.safetensors"):
        for name, value in mx.load(str(file)).items():
            assert mx.max(mx.abs(value - value.reshape(-1)[0])).item() > 0, f"{name} is constant"
    model = load_model(path)
    cfg = model.config
    ids = mx.array([[2, 10, cfg.boi_token_id] + [cfg.image_token_id] * 256 + [cfg.eoi_token_id, 11]])
    rng = np.random.default_rng(0)
    logits = []
    for _ in range(2):
        image = model.encode_images(mx.array(rng.random((1, 3, 128, 128), dtype=np.float32)))
        logits.append(np.array(model(ids, inputs_embeds=model.embed_inputs(ids, image)))[0, -1])
    assert np.isfinite(logits).all()
    assert np.abs(logits[0] - logits[1]).max() > 0.1 * np.abs(logits[0]).max()
