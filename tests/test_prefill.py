"""generation.prefill's pipelining: a chunk is queued (mx.async_eval) before the previous one
is waited for, and waited for before the one two after it is queued (at most two in flight),
with the same logits as the full forward pass (float32, TOL relative to max |ref|)."""

import mlx.core as mx
import pytest
from test_text_parity import TOL, prompt, ref_logits, rel_err

from mlx_gemma3n.generation import prefill
from mlx_gemma3n.loading import load_model

CHUNK, CHUNKS = 5, 5


@pytest.fixture(scope="module")
def text_model(tiny_hf):
    return load_model(tiny_hf[0])


def test_two_chunks_in_flight_at_most(tiny_hf, text_model, monkeypatch):
    queued, events = [], []
    real_async_eval, real_eval = mx.async_eval, mx.eval

    def async_eval(*args):
        queued.append(args[0])
        events.append(("queue", len(queued) - 1))
        real_async_eval(*args)

    def evaluate(*args):
        events.extend(("wait", k) for k, q in enumerate(queued) if args and args[0] is q)
        real_eval(*args)

    ids = prompt(CHUNK * CHUNKS + 1, seed=3)  # the last position runs on its own
    head = mx.array(ids)
    embeds = text_model.embed_inputs(head)
    monkeypatch.setattr(mx, "async_eval", async_eval)
    monkeypatch.setattr(mx, "eval", evaluate)
    logits = prefill(text_model, head, embeds, text_model.make_cache(), chunk_size=CHUNK)
    monkeypatch.undo()

    assert [k for kind, k in events if kind == "queue"] == list(range(CHUNKS))
    for k in range(CHUNKS - 1):  # the next chunk is queued while this one may still run
        assert events.index(("queue", k + 1)) < events.index(("wait", k))
    for k in range(2, CHUNKS):  # but not the one after it
        assert events.index(("wait", k - 2)) < events.index(("queue", k))
    assert rel_err(logits, ref_logits(tiny_hf[1], ids)[:, -1]) < TOL
