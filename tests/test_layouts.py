"""mlx-vlm and mlx-lm checkpoints, made here by those tools' own converters (mlx-vlm 0.7.10,
mlx-lm 0.32.2) from a tiny HF checkpoint in the 2025 Google dialect, load and match ours.

- float32 conversions: logits equal ours on the HF source to <= 1e-5 relative (text, image,
  audio); greedy tokens identical.
- 4-bit conversions (PLE table quantized inside the main shard by mlx-vlm; per-module mixed
  bits by mlx-lm's `mixed_3_6`): logits equal ours on the same weights dequantized to float32
  (written as a plain checkpoint) to <= 1e-5; greedy tokens identical; mlx-lm's own model on
  its own 4-bit checkpoint agrees to <= 1e-5.

mlx-vlm builds the full-size MobileNet-V5 and one FFN width for every layer, so the fixture has
both (images are 256x256, through its processor_config.json, to keep the tower cheap).
"""

import gc
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from reference import build_hf_model, save_hf_checkpoint, save_hf_processor, to_transformers4_dialect

import mlx_gemma3n
from convert import convert
from mlx_gemma3n.loading import load_model
from mlx_gemma3n.processor import user_message
from mlx_gemma3n.tiny import TEXT_VOCAB, write_tiny_tokenizer

ASSETS = Path(__file__).parents[1] / "examples" / "assets"
TOL = 1e-5
GREEDY = 16  # tokens
TEXT_IDS = mx.array(np.random.default_rng(0).integers(7, TEXT_VOCAB - 2, size=(1, 40)))
CHAT = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Describe the cat and the dog."}]


def rel_err(out, ref) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The HF checkpoint (2025 dialect, BPE tokenizer.model + processor files)."""
    root = tmp_path_factory.mktemp("layouts")
    model = build_hf_model({"text_config": {"intermediate_size": [128] * 7}, "vision_config": {"model_args": {}}})
    v5 = save_hf_checkpoint(model, root / "v5", max_shard_size="500MB")
    write_tiny_tokenizer(v5, "bpe")
    path = to_transformers4_dialect(v5, root / "hf", model)
    shutil.rmtree(v5)
    del model
    gc.collect()
    save_hf_processor(path, image_size=256)
    return path


@pytest.fixture(scope="module")
def converted(source):
    """Each tool's own conversions of `source`."""
    from mlx_lm import convert as lm_convert

    vlm_convert = importlib.import_module("mlx_vlm.convert").convert
    out = {}
    for name, run, kwargs in [
        ("mlx-vlm float32", vlm_convert, {"dtype": "float32"}),
        ("mlx-vlm 4-bit", vlm_convert, {"quantize": True, "q_bits": 4, "q_group_size": 64}),
        ("mlx-lm float32", lm_convert, {"dtype": "float32"}),
        ("mlx-lm 4-bit mixed", lm_convert, {"quantize": True, "quant_predicate": "mixed_3_6"}),
    ]:
        out[name] = source.parent / name.replace(" ", "_")
        run(str(source), str(out[name]), **kwargs)
    return out


def dequantized_copy(src: Path, dst: Path) -> Path:
    """`src` with every quantized tensor dequantized to float32 by its config entry (or the
    defaults) and no quantization in config.json; the vision tower (never quantized by these
    tools) is left out."""
    config = json.loads((src / "config.json").read_text())
    q = config.pop("quantization")
    config.pop("quantization_config", None)
    weights = {}
    for file in src.glob("*.safetensors"):
        weights.update(mx.load(str(file)))
    out = {}
    for key, value in weights.items():
        base, _, part = key.rpartition(".")
        if "vision_tower" in key or part in ("scales", "biases") and f"{base}.scales" in weights:
            continue
        if f"{base}.scales" in weights:
            p = q.get(base) if isinstance(q.get(base), dict) else q
            value = mx.dequantize(
                value, weights[f"{base}.scales"], weights.get(f"{base}.biases"),
                group_size=p["group_size"], bits=p["bits"], mode=p.get("mode", "affine"),
            ).astype(mx.float32)
        out[key] = value
    dst.mkdir()
    mx.save_safetensors(str(dst / "model.safetensors"), out)
    (dst / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():
        if f.suffix in (".json", ".jinja") and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def dequantized(converted):
    return {n: dequantized_copy(p, p.parent / f"{p.name}_dequantized") for n, p in converted.items() if "4-bit" in n}


@pytest.fixture(scope="module")
def hf_loaded(source):
    return mlx_gemma3n.load(str(source))


def prompt_logits(loaded, messages):
    """(prompt ids, last-position logits) of the chat prompt, media encoded."""
    model, processor = loaded
    inputs = processor(messages)
    ids = mx.array([inputs.token_ids])
    image = model.encode_images(mx.array(inputs.pixel_values())) if inputs.images else None
    audio = None
    if inputs.audio:
        features, valid = processor.audio_features(inputs.audio)
        audio = model.encode_audio(mx.array(features), mx.array(valid))
    embeds = model.embed_inputs(ids, image, audio)
    return inputs.token_ids, np.array(model(ids, inputs_embeds=embeds)[0, -8:])


def lm_logits(lm_model, ids) -> np.ndarray:
    # With a cache: without one, mlx-lm's KV-shared layers compute their own K/V.
    return np.array(lm_model(mx.array([ids]), cache=lm_model.make_cache()))


def greedy(loaded):
    return [r.token for r in mlx_gemma3n.stream_generate(*loaded, CHAT, max_tokens=GREEDY)]


MEDIA = {
    "text": CHAT,
    "image": [user_message("What is this?", images=[str(ASSETS / "cat.png")])],
    "audio": [user_message("Transcribe.", audio=[str(ASSETS / "speech.flac")])],
}


def test_mlx_vlm_float32_matches_the_hf_source(converted, hf_loaded):
    path = converted["mlx-vlm float32"]
    loaded = mlx_gemma3n.load(str(path))
    assert not (path / "tokenizer.model").exists()  # read from tokenizer.json
    assert loaded[0].language_model.ple_table.weight.file.parent == path  # row-read from its shard
    for kind, messages in MEDIA.items():
        ids, out = prompt_logits(loaded, messages)
        ref_ids, ref = prompt_logits(hf_loaded, messages)
        assert ids == ref_ids
        assert rel_err(out, ref) <= TOL, (kind, rel_err(out, ref))
    assert greedy(loaded) == greedy(hf_loaded)


def test_mlx_lm_float32_matches_the_hf_source_and_mlx_lm(converted, hf_loaded):
    """A text-only conversion embeds every id with the text table, as mlx-lm does: the tiny
    vocabulary puts ordinary text pieces at multimodal ids, so the HF source is compared on
    text-vocabulary ids and the chat prompt and generation on mlx-lm's own model."""
    from mlx_lm import load as lm_load
    from mlx_lm import stream_generate as lm_stream_generate

    path = converted["mlx-lm float32"]
    model, processor = loaded = mlx_gemma3n.load(str(path))
    assert processor.chat_template is not None and not (path / "tokenizer.model").exists()
    assert model.language_model.ple_table.weight.file.parent == path
    assert processor(CHAT).token_ids == hf_loaded[1](CHAT).token_ids
    assert rel_err(np.array(model(TEXT_IDS)), np.array(hf_loaded[0](TEXT_IDS))) <= TOL

    lm_model, lm_tokenizer = lm_load(str(path))
    ids = processor(CHAT).token_ids
    assert rel_err(np.array(model(mx.array([ids]))), lm_logits(lm_model, ids)) <= TOL
    lm_tokens = [r.token for r in lm_stream_generate(lm_model, lm_tokenizer, ids, max_tokens=GREEDY)]
    assert greedy(loaded) == lm_tokens
    with pytest.raises(ValueError, match="this checkpoint has no vision tower"):
        mlx_gemma3n.generate(*loaded, MEDIA["image"], max_tokens=1)


@pytest.mark.parametrize("name", ["mlx-vlm 4-bit", "mlx-lm 4-bit mixed"])
def test_quantized_conversions_match_their_dequantized_weights(converted, dequantized, name):
    loaded = mlx_gemma3n.load(str(converted[name]))
    reference = mlx_gemma3n.load(str(dequantized[name]))
    table = loaded[0].language_model.ple_table
    assert table.quantized and table.weight.file.parent == converted[name]  # row-read from its shard
    kinds = ["text", "audio"] if name.startswith("mlx-vlm") else ["text"]
    for kind in kinds:
        ids, out = prompt_logits(loaded, MEDIA[kind])
        ref_ids, ref = prompt_logits(reference, MEDIA[kind])
        assert ids == ref_ids
        assert rel_err(out, ref) <= TOL, (kind, rel_err(out, ref))
    assert greedy(loaded) == greedy(reference)


def test_mixed_bits_are_read_per_module(converted):
    config = json.loads((converted["mlx-lm 4-bit mixed"] / "config.json").read_text())
    per_module = {k: v for k, v in config["quantization"].items() if isinstance(v, dict)}
    assert {v["bits"] for v in per_module.values()} == {3, 6}
    model, _ = mlx_gemma3n.load(str(converted["mlx-lm 4-bit mixed"]))
    key, params = next((k, v) for k, v in per_module.items() if v["bits"] == 6)
    module = model
    for part in key.removeprefix("model.").split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    assert (module.bits, module.group_size) == (6, params["group_size"] or 64)  # None: the mode's default


def test_mlx_lm_agrees_on_its_own_quantized_checkpoint(converted):
    from mlx_lm import load as lm_load

    path = converted["mlx-lm 4-bit mixed"]
    lm_model, _ = lm_load(str(path))
    model, processor = mlx_gemma3n.load(str(path))
    ids = processor(CHAT).token_ids
    assert rel_err(np.array(model(mx.array([ids]))), lm_logits(lm_model, ids)) <= TOL


def test_converter_and_cli_take_quantized_mlx_vlm_input(converted, dequantized, tmp_path):
    out = convert(str(converted["mlx-vlm 4-bit"]), str(tmp_path / "ours"), dtype="float32", drop=["vision"])
    # Text-vocabulary ids: without the vision part the tiny vocabulary's vision ids are text.
    ours = load_model(out)(TEXT_IDS)
    ref = load_model(dequantized["mlx-vlm 4-bit"])(TEXT_IDS)
    assert rel_err(np.array(ours), np.array(ref)) <= TOL
    assert "quantization" not in json.loads((out / "config.json").read_text())
    r = subprocess.run(
        [sys.executable, "-m", "mlx_gemma3n.generate", "--model", str(converted["mlx-lm 4-bit mixed"]),
         "--prompt", "hello", "--max-tokens", "3"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr
