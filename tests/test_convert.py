"""HF -> MLX conversion: round trip, dtypes, quantization, dropping towers, atomic output."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from convert import convert
from convert import converter as convert_module
from convert.cli import main as convert_main
from mlx_gemma3n.loading import load_model
from mlx_gemma3n.quantized import QuantizedLinear
from mlx_gemma3n.text.transposed import QuantizedTransposedLinear

IDS = np.random.default_rng(0).integers(7, 250, size=(1, 40))


@pytest.fixture(scope="module")
def ref(tiny_hf):
    with torch.no_grad():
        return tiny_hf[1](input_ids=torch.tensor(IDS)).logits.numpy()


def logits(path) -> np.ndarray:
    return np.array(load_model(path)(mx.array(IDS)).astype(mx.float32))


def rel_err(out, ref) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def cosine(out, ref) -> float:
    return float(((out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)).min())


def stored_keys(path) -> list:
    return list(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"])


def test_float32_round_trip_matches_reference(tiny_hf, ref, tmp_path):
    out = convert(tiny_hf[0], tmp_path / "f32", dtype="float32")
    assert rel_err(logits(out), ref) < 1e-5
    assert (out / "tokenizer.model").is_file() and "Source" in (out / "README.md").read_text()
    model = load_model(out)
    assert model.parts == ["embed_vision", "vision_tower", "embed_audio", "audio_tower"]


def test_bfloat16_is_close(tiny_hf, ref, tmp_path):
    out = convert(tiny_hf[0], tmp_path / "bf16", dtype="bfloat16")
    model = load_model(out)
    assert model.language_model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16
    # measured 0.025 max error relative to the logit range, cosine 0.9995
    got = logits(out)
    assert rel_err(got, ref) < 0.08 and cosine(got, ref) > 0.995


@pytest.mark.parametrize(
    "bits,max_err,min_cos",
    # Measured on the tiny random model (group 32, PLE 8-bit): 8-bit 0.033 / 0.9994;
    # 4-bit 0.36 / 0.90.
    # Random 64-wide weights are the worst case for 4-bit; the dequantized-model check
    # below shows the gap is quantization noise only.
    [(8, 0.08, 0.995), (4, 0.8, 0.6)],
)
def test_quantized_stays_close(tiny_hf, ref, tmp_path, bits, max_err, min_cos):
    out = convert(tiny_hf[0], tmp_path / f"q{bits}", dtype="float32", quantize=True, q_bits=bits, q_group_size=32)
    cfg = json.loads((out / "config.json").read_text())
    eight = {"group_size": 32, "bits": 8}  # the PLE table and the audio tower default to 8 bits
    assert cfg["quantization"] == {
        "group_size": 32, "bits": bits, "language_model.embed_tokens_per_layer": eight, "audio_tower": eight
    }
    got = logits(out)
    assert rel_err(got, ref) < max_err and cosine(got, ref) > min_cos


def test_quantized_model_equals_its_dequantized_weights(tiny_hf, tmp_path):
    """The quantized forward is exactly the float forward on the dequantized weights; the
    sparse layers' down_proj is stored transposed ([hidden, dims], quantized along dims)."""
    out = convert(tiny_hf[0], tmp_path / "q4", dtype="float32", quantize=True, q_bits=4, q_group_size=32)
    # unjoined projections (text/concat.py), so that the two models' modules pair up by path
    quant = load_model(out, fuse=False)
    deq = load_model(tiny_hf[0], fuse=False)
    n_quantized = 0
    for path, module in quant.language_model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedTransposedLinear)):
            n_quantized += 1
            w = mx.dequantize(module.weight, module.scales, module.biases, group_size=32, bits=4)
            target = deq.language_model
            for name in path.split("."):
                target = target[int(name)] if name.isdigit() else getattr(target, name)
            target.weight = w.T if isinstance(module, QuantizedTransposedLinear) else w
    assert n_quantized > 20
    lm = quant.language_model
    assert isinstance(lm.altup_projections[0], nn.QuantizedLinear)
    # loading gives every quantized linear the CPU's blocked matmul (mlx_gemma3n/quantized.py)
    assert not any(type(m) is nn.QuantizedLinear for m in quant.modules())
    assert isinstance(lm.altup_projections[0], QuantizedLinear)
    assert isinstance(lm.layers[0].altup.modality_router, nn.Linear)
    assert not isinstance(lm.layers[0].altup.modality_router, nn.QuantizedLinear)
    sparsity = quant.config.text_config.activation_sparsity_pattern
    transposed = [isinstance(layer.mlp.down_proj, QuantizedTransposedLinear) for layer in lm.layers]
    assert transposed == [s > 0 for s in sparsity] and any(transposed)
    deq.language_model.ple_table = quant.language_model.ple_table  # gathers dequantized rows
    a, b = np.array(quant(mx.array(IDS))), np.array(deq(mx.array(IDS)))
    assert rel_err(a, b) < 1e-5


def test_drop_towers(tiny_hf, tmp_path):
    out = convert(tiny_hf[0], tmp_path / "text", dtype="float32", drop=["audio", "vision"])
    keys = stored_keys(out)
    assert keys and all(k.startswith("language_model.") for k in keys)
    cfg = json.loads((out / "config.json").read_text())
    assert "audio_config" not in cfg and "vision_config" not in cfg
    model = load_model(out)
    assert model.parts == []
    with pytest.raises(ValueError, match="no audio tower"):
        model.require("embed_audio")


def test_drop_audio_only(tiny_hf, tmp_path):
    out = convert(tiny_hf[0], tmp_path / "noaudio", dtype="float32", drop=["audio"])
    keys = stored_keys(out)
    assert not [k for k in keys if "audio" in k]
    assert [k for k in keys if k.startswith("vision_tower.")]


def test_existing_output_is_refused(tiny_hf, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(convert_module.ConversionError, match="already exists"):
        convert(tiny_hf[0], tmp_path / "out")


def test_unwritable_output_location(tiny_hf, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        convert_main(["--hf-path", str(tiny_hf[0]), "--mlx-path", str(blocker / "out")])
    assert e.value.code == 1
    assert "cannot write to" in capsys.readouterr().err
    assert blocker.read_text() == ""


def test_failure_midway_leaves_nothing(tiny_hf, tmp_path, monkeypatch):
    def fail_after_first_shard(out, weights, specs, blocks):
        (out / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "write_checkpoint", fail_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_hf[0], tmp_path / "out", dtype="float32")
    assert list(tmp_path.iterdir()) == []


def audio_encoding(model, seed: int = 0) -> np.ndarray:
    features = np.random.default_rng(seed).normal(-4.0, 2.0, (1, 200, 128)).astype(np.float32)
    return np.array(model.encode_audio(mx.array(features), mx.ones((1, 200), dtype=mx.bool_)))


@pytest.mark.parametrize("audio_bits", [8, 0])
def test_audio_tower_quantization(tiny_hf, tmp_path, audio_bits):
    """-q quantizes the audio tower's linears (8-bit by default): its soft tokens stay within
    8-bit noise of the float tower's; --q-audio-bits 0 keeps the tower as it was."""
    out = convert(tiny_hf[0], tmp_path / "qa", dtype="float32", quantize=True, q_bits=4, q_group_size=32,
                  q_audio_bits=audio_bits)
    model = load_model(out)
    model.require("audio_tower")
    n_quantized = sum(isinstance(m, nn.QuantizedLinear) for m in model.audio_tower.modules())
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    if not audio_bits:
        assert n_quantized == 0 and "audio_tower" not in quantization
        np.testing.assert_array_equal(audio_encoding(model), audio_encoding(load_model(tiny_hf[0])))
        return
    assert n_quantized > 10 and quantization["audio_tower"] == {"group_size": 32, "bits": 8}
    got, ref = audio_encoding(model), audio_encoding(load_model(tiny_hf[0]))
    assert rel_err(got, ref) < 0.03 and cosine(got, ref) > 0.999  # measured 0.015 / 0.99989
