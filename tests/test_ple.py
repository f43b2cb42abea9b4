"""The per-layer embedding table is read from the checkpoint by row, never resident."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

from convert import convert
from mlx_gemma3n.loading import load_model
from mlx_gemma3n.text.ple import NAME, PerLayerEmbeddingTable


def proc_kb(field: str) -> int:
    """A kB counter of this process from /proc/self/status."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def bytes_read() -> int:
    """Bytes this process has read through read/pread system calls so far."""
    for line in open("/proc/self/io"):
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise KeyError("rchar")


@pytest.fixture(scope="module")
def big_table(tmp_path_factory):
    """A 65536 x 448 float32 table (115 MB) in a safetensors file."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((65536, 448), dtype=np.float32)
    path = tmp_path_factory.mktemp("ple") / "table.safetensors"
    save_file({f"model.{NAME}.weight": table}, str(path))
    return path, table


def test_gather_reads_only_the_rows_asked_for(big_table):
    path, table = big_table
    ple = PerLayerEmbeddingTable.from_files([path], None)
    ids = np.array([[5, 40_000, 65_535, 7, 5]])  # a repeated id is read once
    before = bytes_read()
    rows = ple(mx.array(ids))
    read = bytes_read() - before
    np.testing.assert_array_equal(np.array(rows), table[ids])
    # 4 distinct rows of 1.75 kB (plus reading /proc/self/io itself), not the 115 MB table
    assert 4 * 448 * 4 <= read < 4 * 448 * 4 + 1024, read


def test_gathered_rows_do_not_stay_resident(big_table):
    """Many random rows from a table in the page cache leave the process no bigger than
    their copy: reading a mapped table instead mapped ~64 kB of neighbours per row touched
    (Linux fault-around): 45 MB here."""
    path, table = big_table
    ple = PerLayerEmbeddingTable.from_files([path], None)
    rng = np.random.default_rng(1)
    mx.eval(ple(mx.array(rng.integers(0, 65536, 64))))  # first use: code pages, allocator
    file_kb, rss_kb = proc_kb("RssFile"), proc_kb("VmRSS")
    ids = rng.integers(0, 65536, 2048)
    rows = ple(mx.array(ids))
    mx.eval(rows)
    np.testing.assert_array_equal(np.array(rows[:8]), table[ids[:8]])
    assert proc_kb("RssFile") - file_kb < 1024
    assert proc_kb("VmRSS") - rss_kb < 3 * rows.nbytes // 1024 + 4096  # 3.7 MB of rows


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_rows_match_the_float_table(big_table, tmp_path, bits):
    """Gather + dequantize equals quantizing the float rows, within the quantization bound."""
    _, table = big_table
    w = mx.array(table[:1024])
    q, scales, biases = mx.quantize(w, group_size=64, bits=bits)
    path = tmp_path / "q.safetensors"
    save_file(
        {f"{NAME}.weight": np.array(q), f"{NAME}.scales": np.array(scales), f"{NAME}.biases": np.array(biases)},
        str(path),
    )
    ple = PerLayerEmbeddingTable.from_files([path], {"group_size": 64, "bits": bits})
    ids = np.array([3, 1000, 17])
    got = np.array(ple(mx.array(ids)))
    expected = np.array(mx.dequantize(q, scales, biases, group_size=64, bits=bits))[ids]
    np.testing.assert_array_equal(got, expected)
    assert_within_quantization_bound(got, table[ids], bits)


def assert_within_quantization_bound(got: np.ndarray, table: np.ndarray, bits: int, group: int = 64):
    # per group the step is (max - min) / (2^bits - 1); MLX shifts its grid so that 0 is
    # exact, so the bound is one step, not half (measured up to 0.86 step at 8 bits)
    groups = table.reshape(len(table), -1, group)
    step = (groups.max(-1) - groups.min(-1)) / (2**bits - 1)
    err = np.abs(got - table).reshape(len(table), -1, group).max(-1)
    assert (err <= step * (1 + 1e-3) + 1e-6).all()


def test_model_holds_no_ple_parameters(tiny_hf):
    model = load_model(tiny_hf[0])
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert not [k for k in names if "per_layer" in k and "embed" in k]
    assert isinstance(model.language_model.ple_table, PerLayerEmbeddingTable)


def test_converted_ple_is_its_own_quantized_file(tiny_hf, tmp_path):
    out = convert(tiny_hf[0], tmp_path / "q", dtype="float32", quantize=True, q_bits=4, q_group_size=32)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert {k for k, f in index.items() if f == "per_layer_embeddings.safetensors"} == {
        f"{NAME}.weight",
        f"{NAME}.scales",
        f"{NAME}.biases",
    }
    ple = load_model(out).language_model.ple_table
    assert ple.quantized and ple.bits == 8 and ple.weight.dtype == mx.uint32


def test_converted_4bit_ple_matches_the_hf_table(tiny_hf, tmp_path):
    out = convert(tiny_hf[0], tmp_path / "q4", dtype="float32", quantize=True, q_bits=4, q_group_size=32, q_ple_bits=4)
    ple = load_model(out).language_model.ple_table
    assert ple.quantized and ple.bits == 4
    table = tiny_hf[1].model.language_model.embed_tokens_per_layer.weight.detach().numpy()
    ids = np.arange(0, table.shape[0], 7)
    assert_within_quantization_bound(np.array(ple(mx.array(ids))), table[ids], bits=4, group=ple.group_size)


def test_towers_load_only_when_used(tiny_hf):
    model = load_model(tiny_hf[0])
    assert model.parts == ["embed_vision", "vision_tower", "embed_audio", "audio_tower"]
    assert "vision_tower" not in model and "embed_audio" not in model
    model.require("embed_audio")
    assert "embed_audio" in model and "audio_tower" not in model
    text_only = load_model(tiny_hf[0], lazy=False)
    with pytest.raises(ValueError, match="text-only"):
        text_only.require("vision_tower")
