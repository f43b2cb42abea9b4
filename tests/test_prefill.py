"""generation.prefill's pipelining: each layer of a chunk that writes a cache (but the last) is
queued (mx.async_eval) as it is built, then the chunk's caches, never a KV-shared layer (with
PREFILL_UNIT "chunk" only the caches); a unit is waited for once the PREFILL_DEPTH after it
are queued and before any more is (so PREFILL_DEPTH are in flight while the host builds the
next); a chunk before the last position builds no KV-shared layer; the next chunk's
per-layer rows are read on a thread meanwhile; on the CPU, MLX keeps no buffer cache
meanwhile; the logits are the full forward pass's (float32, TOL relative to max |ref|)."""

import threading

import mlx.core as mx
import pytest
from test_text_parity import TOL, prompt, ref_logits, rel_err

from mlx_gemma3n import generation
from mlx_gemma3n.generation import prefill
from mlx_gemma3n.loading import load_model
from mlx_gemma3n.text.config import TextConfig
from mlx_gemma3n.text.decoder import DecoderLayer
from mlx_gemma3n.text.model import TextModel
from mlx_gemma3n.tiny import TINY_CONFIG

CHUNK, CHUNKS = 5, 5


@pytest.fixture(scope="module")
def text_model(tiny_hf):
    return load_model(tiny_hf[0])


def patched_prefill(text_model, monkeypatch, seed: int, patches: list):
    """(ids, last logits) of a prompt of CHUNKS chunks and a last position, prefilled in chunks
    of CHUNK with `patches` ((object, name, value) each) in place."""
    ids = prompt(CHUNK * CHUNKS + 1, seed=seed)  # the last position runs on its own
    head = mx.array(ids)
    embeds = text_model.embed_inputs(head)
    for target, name, value in patches:
        monkeypatch.setattr(target, name, value)
    logits = prefill(text_model, head, embeds, text_model.make_cache(), chunk_size=CHUNK)
    monkeypatch.undo()
    return ids, logits


@pytest.mark.parametrize("unit, depth", [("layer", 2), ("layer", 1), ("chunk", 2)])
def test_units_in_flight_at_most_depth(tiny_hf, text_model, monkeypatch, unit, depth):
    queued, events = [], []
    real_async_eval, real_eval = mx.async_eval, mx.eval

    def async_eval(*args):
        queued.append(args[0])
        events.append(("queue", len(queued) - 1))
        real_async_eval(*args)

    def evaluate(*args):
        events.extend(("wait", k) for k, q in enumerate(queued) if args and args[0] is q)
        real_eval(*args)

    ids, logits = patched_prefill(text_model, monkeypatch, 3,
                                  [(mx, "async_eval", async_eval), (mx, "eval", evaluate),
                                   (generation, "PREFILL_UNIT", unit), (generation, "PREFILL_DEPTH", depth)])

    config = text_model.language_model.config
    assert 1 < config.first_kv_shared_layer < config.num_hidden_layers  # the tiny model shares K/V
    # a chunk's layers but the last, then its caches; or the caches alone. The last chunk
    # (the last position) queues its layers but the last that writes a cache, then returns.
    per_chunk = config.first_kv_shared_layer if unit == "layer" else 1
    units = CHUNKS * per_chunk + (per_chunk - 1)
    assert [k for kind, k in events if kind == "queue"] == list(range(units))
    for k in range(units - depth):  # waited for once `depth` more are queued
        waited = events.index(("wait", k))
        assert events.index(("queue", k + depth)) < waited
        if k + depth + 1 < units:
            assert waited < events.index(("queue", k + depth + 1))
    streams = (4, 1, CHUNK, config.hidden_size)  # AltUp streams [n, B, L, D], then caches' (K, V)
    is_streams = [isinstance(q[0], mx.array) and q[0].shape == streams for q in queued[:per_chunk]]
    assert is_streams == [True] * (per_chunk - 1) + [False]
    assert rel_err(logits, ref_logits(tiny_hf[1], ids)[:, -1]) < TOL


def test_next_chunks_rows_are_read_on_a_thread_while_this_chunk_is_built(text_model, monkeypatch):
    """Each chunk's per-layer rows (but the first's) are read while the chunk before is being
    queued: a read that waited for that chunk's first layer in the main thread would never
    return (it times out and fails)."""
    lm = text_model.language_model
    per_chunk = lm.config.first_kv_shared_layer
    first_layer_queued = [threading.Event() for _ in range(CHUNKS + 1)]
    reads, units = [], []
    real_read, real_async_eval = lm.read_per_layer_rows, mx.async_eval

    def read(ids):
        chunk = len(reads)
        reads.append((threading.current_thread() is threading.main_thread(), ids.shape[1]))
        if chunk > 0:
            assert first_layer_queued[chunk - 1].wait(timeout=20), f"chunk {chunk}'s rows read too late"
        return real_read(ids)

    def async_eval(*args):
        if len(units) % per_chunk == 0:
            first_layer_queued[len(units) // per_chunk].set()
        units.append(args)
        real_async_eval(*args)

    ids, got = patched_prefill(text_model, monkeypatch, 4,
                               [(lm, "read_per_layer_rows", read), (mx, "async_eval", async_eval)])
    assert reads == [(False, CHUNK)] * CHUNKS + [(False, 1)]  # on the reader thread, chunk by chunk
    head = mx.array(ids)
    want = prefill(text_model, head, text_model.embed_inputs(head), text_model.make_cache(), chunk_size=len(ids))
    assert rel_err(got, want) < TOL


def test_cpu_prefill_keeps_no_mlx_buffer_cache(text_model, monkeypatch):
    """On the CPU backend the prefill runs with MLX's buffer cache off (freed buffers go back
    to the C allocator at once) and restores the caller's cache limit after."""
    assert mx.default_device() == mx.cpu
    cached, real_async_eval = [], mx.async_eval

    def async_eval(*args):
        mx.eval(*args)  # every buffer of the units before is freed by now
        cached.append(mx.get_cache_memory())
        real_async_eval(*args)

    limit = 1 << 30
    before = mx.set_cache_limit(limit)
    try:
        patched_prefill(text_model, monkeypatch, 5, [(mx, "async_eval", async_eval)])
    finally:
        restored = mx.set_cache_limit(before)
    assert restored == limit
    assert len(cached) == (CHUNKS + 1) * text_model.language_model.config.first_kv_shared_layer - 1
    assert max(cached) == 0


def test_kv_shared_layers_are_built_for_the_last_position_only(text_model, monkeypatch):
    """A chunk before the prompt's last position builds only the layers that write a cache
    (the KV-shared layers' graphs would never run); the last position goes through all."""
    lm = text_model.language_model
    index = {id(layer): i for i, layer in enumerate(lm.layers)}
    built, real = [], DecoderLayer.__call__

    def counted(self, *args, **kwargs):
        built.append(index[id(self)])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DecoderLayer, "__call__", counted)
    ids = prompt(CHUNK * CHUNKS + 1, seed=6)
    head = mx.array(ids)
    prefill(text_model, head, text_model.embed_inputs(head), text_model.make_cache(), chunk_size=CHUNK)
    monkeypatch.undo()
    n, owners = lm.config.num_hidden_layers, lm.config.first_kv_shared_layer
    assert built == list(range(owners)) * CHUNKS + list(range(n))


@pytest.mark.parametrize("kv_shared", [3, 0])
@pytest.mark.parametrize("context, length", [(0, 1), (0, 6), (5, 12), (13, 4)])
def test_outputs_last_and_none_match_all(kv_shared, context, length):
    """TextModel's `outputs`: "last" equals the last row of "all" (the KV-shared layers, or
    with none of them the exit, taken at the last position alone, past the sliding window
    too) and "none" leaves the same caches; random float32 weights of the tiny config, with
    and without KV-shared layers."""
    config = TextConfig.from_dict(dict(TINY_CONFIG["text_config"], num_kv_shared_layers=kv_shared))
    mx.random.seed(kv_shared)
    lm = TextModel(config)
    per_layer_dims = (config.num_hidden_layers, config.hidden_size_per_layer_input)

    def run(outputs: str):
        cache = lm.make_cache()
        for n, out in ((context, "none"), (length, outputs)):
            if n:
                embeds = mx.random.normal((1, n, config.hidden_size), key=mx.random.key(n))
                rows = mx.random.normal((1, n, *per_layer_dims), key=mx.random.key(n + 1))
                result = lm(embeds, rows, cache, outputs=out)
        mx.eval(result, [c.state for c in cache])
        return result, cache

    (every, caches), (last, _), (none, none_caches) = run("all"), run("last"), run("none")
    assert every.shape[1] == length and last.shape[1] == 1 and none is None
    assert float(mx.abs(last[:, 0] - every[:, -1]).max()) <= 1e-5 * float(mx.abs(every[:, -1]).max())
    for a, b in zip(caches, none_caches):
        assert a.offset == b.offset == context + length
        assert all(mx.array_equal(x, y) for x, y in zip(a.state, b.state))
