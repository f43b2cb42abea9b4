"""Text decoder parity with transformers' Gemma3nForConditionalGeneration (float32, eager).

Error metric: max |mlx - ref| / max |ref| over all logits of the sequence. Measured on the tiny
checkpoint: ~1.2e-6 (tolerance 1e-5, tighter than the 1e-4 floor)."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gemma3n import generation
from mlx_gemma3n.generation import generate_step, prefill
from mlx_gemma3n.loading import load_model

TOL = 1e-5
WINDOW = 8  # TINY_CONFIG sliding_window


def rel_err(out, ref) -> float:
    return float(np.abs(np.asarray(out) - np.asarray(ref)).max() / np.abs(ref).max())


def ref_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def text_model(tiny_hf):
    return load_model(tiny_hf[0])


def prompt(length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(7, 250, size=(1, length))


@pytest.mark.parametrize("length", [1, 4, 3 * WINDOW + 5])
def test_logits_match_transformers(tiny_hf, text_model, length):
    ids = prompt(length, seed=length)
    ref = ref_logits(tiny_hf[1], ids)
    assert rel_err(text_model(mx.array(ids)), ref) < TOL


def test_transformers4_dialect_loads_and_matches(tiny_hf_v4, tiny_hf):
    """rope_theta/rope_local_base_freq config and K/V weights on KV-shared layers (ignored)."""
    model = load_model(tiny_hf_v4[0])
    ids = prompt(2 * WINDOW + 3, seed=7)
    assert rel_err(model(mx.array(ids)), ref_logits(tiny_hf[1], ids)) < TOL


def test_batch_of_two_matches(tiny_hf, text_model):
    ids = np.concatenate([prompt(12, seed=1), prompt(12, seed=2)])
    assert rel_err(text_model(mx.array(ids)), ref_logits(tiny_hf[1], ids)) < TOL


def test_every_layer_kind_changes_the_output(text_model):
    """A guard that the parity tests exercise what they claim: sparsity, KV sharing and
    the sliding window each change the logits of a long prompt."""
    c = text_model.config.text_config
    assert any(s > 0 for s in c.activation_sparsity_pattern)
    assert {c.layer_types[i] for i in range(c.first_kv_shared_layer, c.num_hidden_layers)} == {
        "sliding_attention",
        "full_attention",
    }
    assert len(set(c.intermediate_size)) > 1 and c.altup_num_inputs == 4
    ids = mx.array(prompt(3 * WINDOW, seed=3))
    base = np.array(text_model(ids))
    c.sliding_window = 10_000
    try:
        wide = np.array(text_model(ids))
    finally:
        c.sliding_window = WINDOW
    assert np.abs(base[:, :WINDOW] - wide[:, :WINDOW]).max() < 1e-5
    assert np.abs(base[:, -1] - wide[:, -1]).max() > 1e-3


@pytest.mark.parametrize("chunk", [3, 64])
def test_cached_prefill_and_decode_equal_full_forward(tiny_hf, text_model, chunk):
    """Prefill in chunks, then decode one token at a time across the sliding-window
    boundary; every step's logits equal the full forward pass of the whole sequence."""
    ids = prompt(3 * WINDOW + 6, seed=11)
    n_prompt = 5
    full = ref_logits(tiny_hf[1], ids)
    cache = text_model.make_cache()
    head = mx.array(ids[:, :n_prompt])
    last = prefill(text_model, head, text_model.embed_inputs(head), cache, chunk_size=chunk)
    assert rel_err(last, full[:, n_prompt - 1]) < TOL
    for t in range(n_prompt, ids.shape[1]):
        step = text_model(mx.array(ids[:, t : t + 1]), cache=cache)
        assert rel_err(step[:, 0], full[:, t]) < TOL, f"decode step at position {t}"


@pytest.mark.parametrize("chunk", [WINDOW - 3, 2 * WINDOW + 1, 64])
def test_long_prompt_chunked_prefill_then_decode(tiny_hf, text_model, chunk):
    """A prompt several windows long, prefilled in chunks smaller than the window, longer
    than it, or whole; its last chunk is several tokens (the KV-shared layers run for the
    last one alone, with its row of each sliding mask)."""
    ids = prompt(5 * WINDOW + 1, seed=12)
    full = ref_logits(tiny_hf[1], ids)
    cache = text_model.make_cache()
    head = mx.array(ids[:, :-1])
    n = head.shape[1]
    assert n - (n - 1) // chunk * chunk > 1  # the last chunk's length
    last = prefill(text_model, head, text_model.embed_inputs(head), cache, chunk_size=chunk)
    assert rel_err(last, full[:, -2]) < TOL
    step = text_model(mx.array(ids[:, -1:]), cache=cache)
    assert rel_err(step[:, 0], full[:, -1]) < TOL


@pytest.mark.parametrize("yield_first", [True, False], ids=["cpu-order", "accelerator-order"])
def test_greedy_generation_is_token_identical_to_transformers(tiny_hf, text_model, yield_first, monkeypatch):
    """70 greedy tokens from a 6-token prompt: crosses the 8-token sliding window many times.
    transformers' min_new_tokens masks the end ids (1, 6); a logits processor does the same here.
    Both orders of yielding a token and queueing the next step (generation.yields_before_queueing)."""
    monkeypatch.setattr(generation, "yields_before_queueing", lambda: yield_first)
    ids = prompt(6, seed=5)
    with torch.no_grad():
        ref = tiny_hf[1].generate(
            input_ids=torch.tensor(ids),
            max_new_tokens=70,
            min_new_tokens=70,
            do_sample=False,
        )[0, ids.shape[1] :].tolist()
    def no_end(history, logits):
        banned = np.where(np.isin(np.arange(logits.shape[-1]), [1, 6]), -np.inf, 0.0)
        return logits + mx.array(banned, logits.dtype)

    steps = generate_step(text_model, mx.array(ids[0]), max_tokens=70, logits_processors=[no_end])
    ours = [t for t, _ in steps]
    assert len(ref) == 70
    assert ours == ref
