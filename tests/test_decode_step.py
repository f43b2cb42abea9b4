"""The compiled decode step (generation.DecodeStep over text/cache.py's fixed-shape caches)
against transformers' full forward pass of the whole sequence, float32: every step's logits
within TOL (1e-5) relative to max |ref|, across the sliding window, a full-attention buffer
growth, the uncompiled path, a prompt-cache round trip and a further prefill."""

import mlx.core as mx
import numpy as np
import pytest
from test_text_parity import TOL, WINDOW, prompt, ref_logits, rel_err

from mlx_gemma3n.api import PromptCache
from mlx_gemma3n.generation import DecodeStep, prefill
from mlx_gemma3n.loading import load_model
from mlx_gemma3n.text import cache as step_cache


@pytest.fixture(scope="module")
def text_model(tiny_hf):
    return load_model(tiny_hf[0])


def prefilled(model, ids: np.ndarray, chunk: int):
    cache = model.make_cache()
    head = mx.array(ids)
    prefill(model, head, model.embed_inputs(head), cache, chunk_size=chunk)
    return cache


@pytest.mark.parametrize("chunk", [3, 64])
def test_compiled_steps_equal_full_forward(tiny_hf, text_model, chunk):
    """From a short prompt (sliding buffers not yet full, then wrapping many times)."""
    ids = prompt(4 * WINDOW + 6, seed=11)
    full = ref_logits(tiny_hf[1], ids)
    n_prompt = 5
    step = DecodeStep(text_model, prefilled(text_model, ids[:, :n_prompt], chunk))
    for t in range(n_prompt, ids.shape[1]):
        assert rel_err(step(int(ids[0, t])), full[:, t]) < TOL, f"decode step at position {t}"


def test_full_attention_buffer_grows(tiny_hf, text_model):
    """Past 256 positions the full-attention buffers grow (and the step is traced again)."""
    n_prompt = step_cache.mlx_lm_cache.KVCache().step - 3
    ids = prompt(n_prompt + 8, seed=13)
    full = ref_logits(tiny_hf[1], ids)
    cache = prefilled(text_model, ids[:, :n_prompt], 64)
    step = DecodeStep(text_model, cache)
    full_cache = next(c for c in cache if not isinstance(c, step_cache.mlx_lm_cache.RotatingKVCache))
    for t in range(n_prompt, ids.shape[1]):
        assert rel_err(step(int(ids[0, t])), full[:, t]) < TOL, f"decode step at position {t}"
    grow = step_cache.mlx_lm_cache.KVCache().step
    assert full_cache.keys.shape[2] == 2 * grow and full_cache.offset == ids.shape[1]


def test_compiled_and_uncompiled_steps_share_the_caches(tiny_hf, text_model, tmp_path):
    """Compiled steps, uncompiled steps (as multimodal ids take), a prompt-cache file round
    trip and a multi-token prefill chunk (a chat's next turn) interleave on one cache."""
    ids = prompt(5 * WINDOW, seed=17)
    full = ref_logits(tiny_hf[1], ids)
    cache = prefilled(text_model, ids[:, :6], 4)
    step = DecodeStep(text_model, cache)
    t = 6
    for compiled in (True, False, True, True, False, False, True):
        logits = step(int(ids[0, t])) if compiled else text_model(mx.array(ids[:, t : t + 1]), cache=cache)[:, -1]
        assert rel_err(logits, full[:, t]) < TOL, f"step at {t}, compiled={compiled}"
        t += 1
    PromptCache(cache).save(tmp_path / "c.safetensors")
    cache = PromptCache.load(tmp_path / "c.safetensors").cache
    head = mx.array(ids[:, t : t + WINDOW + 2])  # a turn longer than the window
    last = prefill(text_model, head, text_model.embed_inputs(head), cache, chunk_size=5)
    t += WINDOW + 2
    assert rel_err(last, full[:, t - 1]) < TOL
    step = DecodeStep(text_model, cache)
    for t in range(t, ids.shape[1]):
        assert rel_err(step(int(ids[0, t])), full[:, t]) < TOL, f"decode step at position {t}"


def test_tokens_outside_the_text_vocabulary_take_the_uncompiled_path(text_model):
    """A multimodal id needs its embedder, which only the uncompiled path runs; both give
    the same caches and logits."""
    audio_id = text_model.config.audio_config["vocab_offset"]  # a hard audio token: embed_audio
    ids = prompt(6, seed=19)
    caches = [prefilled(text_model, ids, 3) for _ in range(2)]
    ref = text_model(mx.array([[audio_id]]), cache=caches[0])[:, -1]
    out = DecodeStep(text_model, caches[1])(audio_id)
    assert np.array_equal(np.array(out), np.array(ref))
    assert [c.offset for c in caches[0]] == [c.offset for c in caches[1]]


def test_requests_share_one_compiled_step_per_kernel_setting(text_model):
    """A new DecodeStep (one per request) reuses its model's compiled step, so only the first
    request traces; another kernel setting (a kernel factory, the kernels turned off) gets a
    step of its own, since a trace bakes the kernel choice in."""
    from mlx_gemma3n.kernels import set_kernels, use_factory

    def compiled():
        return DecodeStep(text_model, text_model.make_cache())._compiled

    first = compiled()
    assert compiled() is first
    with use_factory(mx.fast.metal_kernel, self_check=False):  # built, never called here
        with_kernels = compiled()
        set_kernels(text_model, False)
        try:
            without = compiled()
        finally:
            set_kernels(text_model, True)
        assert len({id(first), id(with_kernels), id(without)}) == 3
        assert compiled() is with_kernels
    assert compiled() is first
