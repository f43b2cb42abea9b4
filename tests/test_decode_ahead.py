"""Decode steps built before their token is known (generation.Decoder.prepare/dispatch): the
step's graph exists before the token it follows is computed, and the token's per-layer row
is read into the step's StoredRow memory afterwards. Such a step must give bit-identical
logits to one built after (same compiled graph, same values) and, float32, transformers'
full forward within TOL (1e-5 relative) across the sliding window, for the table as the HF
checkpoint stores it (float32) and 8-bit with bfloat16 scales (a 4-bit conversion)."""

import mlx.core as mx
import numpy as np
import pytest
from test_text_parity import TOL, WINDOW, prompt, ref_logits, rel_err

from convert import convert
from mlx_gemma3n import generation
from mlx_gemma3n.api import SamplingOptions
from mlx_gemma3n.generation import DecodeStep, Decoder, generate_step, prefill
from mlx_gemma3n.loading import load_model


@pytest.fixture(scope="module", params=["float32", "quantized"])
def model(request, tiny_hf, tmp_path_factory):
    if request.param == "float32":
        return load_model(tiny_hf[0])
    out = tmp_path_factory.mktemp("q4") / "m"
    return load_model(convert(tiny_hf[0], out, dtype="bfloat16", quantize=True, q_bits=4, q_group_size=32))


def prefilled(model, ids: np.ndarray):
    cache = model.make_cache()
    head = mx.array(ids)
    prefill(model, head, model.embed_inputs(head), cache, chunk_size=3)
    return cache


def values(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))


def lazy(token_id: int, after: mx.array) -> mx.array:
    """`token_id` as an unevaluated array that depends on `after` (as a sampled token does)."""
    return (mx.argmax(after, axis=-1) * 0 + token_id).astype(mx.uint32)


def test_steps_built_ahead_equal_steps_built_after(model):
    """Each step is built while the previous one is unevaluated, its row read afterwards."""
    assert model.language_model.ple_table.quantized == (model.config.quantization is not None)
    ids = prompt(3 * WINDOW + 5, seed=23)[0].tolist()
    after = DecodeStep(model, prefilled(model, np.array([ids[:4]])))
    ahead = DecodeStep(model, prefilled(model, np.array([ids[:4]])))
    assert ahead.ahead
    built = ahead.build(mx.array([ids[4]]))
    ahead.commit(built, ids[4])
    for t in range(4, len(ids) - 1):
        following = ahead.build(lazy(ids[t + 1], built.logits))  # step t not evaluated yet
        assert np.array_equal(values(built.logits), values(after(ids[t]))), f"step after position {t}"
        ahead.commit(following, ids[t + 1])
        built = following
    assert np.array_equal(values(built.logits), values(after(ids[-1])))
    assert [c.offset for c in ahead.cache] == [c.offset for c in after.cache] == [len(ids)] * len(after.cache)


def test_steps_built_ahead_match_transformers(tiny_hf):
    model = load_model(tiny_hf[0])
    ids = prompt(3 * WINDOW + 5, seed=29)
    full = ref_logits(tiny_hf[1], ids)
    decoder = Decoder(model, prefilled(model, ids[:, :3]), mx.array(ids[0, :3]))
    token = mx.array([int(ids[0, 3])])
    ahead = decoder.prepare(token)
    for t in range(3, ids.shape[1] - 1):
        _, logprobs = decoder.dispatch(ahead, token, int(ids[0, t]))
        token = lazy(int(ids[0, t + 1]), logprobs)
        ahead = decoder.prepare(token)
        logits = np.array(logprobs)
        ref = full[:, t] - np.log(np.exp(full[:, t] - full[:, t].max()).sum()) - full[:, t].max()
        assert rel_err(logits, ref) < TOL, f"step after position {t}"


def test_multimodal_ids_drop_the_step_built_ahead(model):
    """A sampled hard audio token needs embed_audio: the compiled step built for it is
    dropped unrun and the uncompiled path gives the same caches and logits as for a step
    that never was built ahead."""
    audio_id = model.config.audio_config["vocab_offset"]
    ids = prompt(6, seed=31)
    caches = [prefilled(model, ids) for _ in range(2)]
    ref = model(mx.array([[audio_id]]), cache=caches[0])[:, -1]
    decoder = Decoder(model, caches[1], mx.array(ids[0]))
    token = mx.array([audio_id])
    _, logprobs = decoder.dispatch(decoder.prepare(token), token, audio_id)
    expected = ref - mx.logsumexp(ref, axis=-1, keepdims=True)
    assert np.array_equal(values(logprobs), values(expected))
    assert [c.offset for c in caches[0]] == [c.offset for c in caches[1]]


@pytest.mark.parametrize("seed", [None, 3])
def test_generation_is_the_same_where_rows_are_read_first(model, monkeypatch, seed):
    """Where a device cannot see in-place writes, every step reads its row first: greedy and
    seeded tokens are those of steps built ahead. (Text ids only: a step built ahead for a
    multimodal id is dropped, and its sample has taken a draw of the seeded sequence.)"""
    ids = mx.array(prompt(5, seed=37)[0])
    text_vocab = model.config.text_config.vocab_size_per_layer_input
    multimodal = mx.arange(model.config.text_config.vocab_size) >= text_vocab

    def text_only(history, logits):  # and no token twice in a row: the history is kept too
        return mx.where(multimodal | (mx.arange(logits.shape[-1]) == history[-1]), -mx.inf, logits)

    def run():
        sampler = SamplingOptions(temperature=1.0, seed=seed).sampler() if seed else None
        steps = generate_step(model, ids, max_tokens=2 * WINDOW + 3, sampler=sampler, logits_processors=[text_only])
        return [t for t, _ in steps]

    ahead = run()
    assert max(ahead) < text_vocab and len(set(ahead)) > 3
    monkeypatch.setattr(generation, "in_place_reads_work", lambda: False)
    assert not Decoder(model, model.make_cache(), ids).step.ahead
    assert run() == ahead


@pytest.mark.parametrize("yield_first", [True, False], ids=["cpu-order", "accelerator-order"])
def test_stopping_early_leaves_whole_caches(tiny_hf, yield_first, monkeypatch):
    """Closing the generator after a token leaves the caches holding exactly the prompt and
    the tokens yielded, the last one only where the step after it was queued before it was
    yielded (on an accelerator; on the CPU, queueing runs most of a step, so a token is
    yielded first), and the cache continues a conversation as the full forward does."""
    assert generation.yields_before_queueing() == (mx.default_device() == mx.cpu)
    monkeypatch.setattr(generation, "yields_before_queueing", lambda: yield_first)
    model = load_model(tiny_hf[0])
    ids = prompt(4, seed=41)
    cache = model.make_cache()
    steps = generate_step(model, mx.array(ids[0]), cache, max_tokens=50)
    got = [next(steps)[0] for _ in range(WINDOW + 2)]
    steps.close()
    held = cache[0].offset - ids.shape[1]
    assert held == len(got) - yield_first
    more = prompt(3, seed=43)
    seq = np.concatenate([ids, np.array([got]), more], axis=1)
    head = mx.array(seq[:, ids.shape[1] + held :])
    last = prefill(model, head, model.embed_inputs(head), cache, chunk_size=2)
    assert rel_err(last, ref_logits(tiny_hf[1], seq)[:, -1]) < TOL
