"""Token generation: chunked prefill over the caches, then one token per step."""

from functools import partial
from typing import Any, Callable, Generator, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .kernels import kernel_setting
from .model import Gemma3n
from .text import cache as step_cache

# Prompt tokens per prefill step. Activations grow linearly with it (E4B at a 2K context,
# float32: +108 MB over the weights at 256, +213 MB at 512) while the work per token does not,
# and E4B's 4-bit weights alone leave ~0.2 GB under its 2.8 GB budget.
PREFILL_CHUNK = 256

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def prefill(
    model: Gemma3n,
    input_ids: mx.array,
    inputs_embeds: mx.array,
    cache: List[Any],
    chunk_size: int = PREFILL_CHUNK,
) -> mx.array:
    """Run the prompt ([B, L] ids and their `embed_inputs`) through the model in chunks of
    `chunk_size` tokens, filling `cache`; returns the logits of the last position ([B, vocab]).
    Chunking bounds the attention scores, the activations and the per-layer embeddings
    (read from the checkpoint per chunk) to chunk_size rows however long the prompt is.

    All but the last token go through with only the caches evaluated: the KV-shared layers
    (the last third or so) write no cache, so MLX never computes them there, and they run
    for the last position alone, whose logits are all that is needed (-20% prefill time).

    A chunk is queued (`mx.async_eval`) and the next one's rows read and graph built while
    it runs; a chunk is waited for before the one two after it is queued, so at most two
    are in flight and memory stays bounded by the chunking."""
    lm = model.language_model

    def run(start: int, end: int) -> mx.array:
        per_layer = lm.per_layer_embeddings(input_ids[:, start:end])
        return lm(inputs_embeds[:, start:end], per_layer, cache)

    last = inputs_embeds.shape[1] - 1
    if last < 0:
        raise ValueError("the prompt is empty: give at least one token")
    in_flight = []
    for start in range(0, last, chunk_size):
        run(start, min(start + chunk_size, last))
        in_flight.append([c.state for c in cache])
        mx.async_eval(in_flight[-1])
        if len(in_flight) == 2:
            mx.eval(in_flight.pop(0))
    return model.logits(run(last, last + 1)[:, -1, :])


class _CompiledSteps:
    """A model's compiled decode steps, one per kernel setting. Kept on the model, not on a
    `DecodeStep`: a new `mx.compile` traces anew, and every request makes a DecodeStep (a
    trace costs 0.2-0.6 s for E2B/E4B on MLX-CPU)."""

    def __init__(self):
        self.by_setting = {}


def _forward(model: Gemma3n, sliding: Tuple[bool, ...], ids, ple_rows, offset, sliding_slot,
             *buffers):
    lm = model.language_model
    per_layer = lm.scale_per_layer_rows(ple_rows)
    full_slot = offset.reshape(1)
    views = [
        step_cache.StepCache(buffers[2 * i], buffers[2 * i + 1], offset, sliding_slot if s else full_slot)
        for i, s in enumerate(sliding)
    ]
    hidden = lm(lm.embed(ids), per_layer, views)
    return (model.logits(hidden[:, -1, :]), *step_cache.buffers(views))


def _compiled_step(model: Gemma3n, sliding: Tuple[bool, ...]) -> Callable:
    steps = getattr(model, "_compiled_steps", None)
    if steps is None:
        steps = model._compiled_steps = _CompiledSteps()
    setting = (sliding, *kernel_setting(model.language_model.use_kernels))
    if setting not in steps.by_setting:
        steps.by_setting[setting] = mx.compile(partial(_forward, model, sliding))
    return steps.by_setting[setting]


class DecodeStep:
    """One decode step as a single compiled call over fixed-shape caches (text/cache.py).

    Building a step in Python costs milliseconds of host time per token (thousands of
    array operations), and it cannot start before the previous token is known: its
    per-layer embedding rows are read from the file by token id. Compiled, the graph is
    traced once (again only when the full-attention buffers grow, every 256 tokens) and a
    step is a replay: read the rows, one call, the offsets advanced on the host.

    Tokens outside the text vocabulary (multimodal ids, which need their embedder) take the
    uncompiled path; both write the same caches."""

    def __init__(self, model: Gemma3n, cache: List[Any]):
        self.model, self.cache = model, cache
        self.text_vocab = model.config.text_config.vocab_size_per_layer_input
        sliding = tuple(isinstance(c, step_cache.mlx_lm_cache.RotatingKVCache) for c in cache)
        self._compiled = _compiled_step(model, sliding)

    def __call__(self, token_id: int) -> mx.array:
        """The logits [1, vocab] after `token_id` (lazy); the caches hold it afterwards."""
        ids = mx.array([[token_id]])
        table = self.model.language_model.ple_table
        if not 0 <= token_id < self.text_vocab or table is None:
            return self.model(ids, cache=self.cache)[:, -1, :]
        ple_rows = table.rows(np.array([token_id]))[None]  # read by id: no unique/where
        slot = step_cache.fit(self.cache)
        offset = mx.array(self.cache[0].offset, dtype=mx.int32)
        logits, *buffers = self._compiled(
            ids, ple_rows, offset, mx.array([slot], dtype=mx.int32), *step_cache.buffers(self.cache)
        )
        step_cache.advance(self.cache, buffers, slot)
        return logits


class Decoder:
    """Sampling after a prefill: `choose` turns logits into (token, log-probabilities), and a
    call runs one `DecodeStep` after the token and chooses the next (lazily)."""

    def __init__(
        self,
        model: Gemma3n,
        cache: List[Any],
        history: mx.array,
        sampler: Optional[Sampler] = None,
        logits_processors: Optional[List[LogitsProcessor]] = None,
    ):
        self.step = DecodeStep(model, cache)
        self.history = history  # the processors' alone: kept only when there are some
        self.sampler = sampler or greedy
        self.processors = logits_processors or []
        self.unembeddable = model.unembeddable_ids()

    def choose(self, logits: mx.array) -> Tuple[mx.array, mx.array]:
        if self.unembeddable is not None:
            logits = mx.where(self.unembeddable, -mx.inf, logits)
        for processor in self.processors:
            logits = processor(self.history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return self.sampler(logprobs), logprobs

    def __call__(self, token: mx.array, token_id: int) -> Tuple[mx.array, mx.array]:
        """`token` ([1], evaluated) is `token_id`."""
        if self.processors:
            self.history = mx.concatenate([self.history, token])
        return self.choose(self.step(token_id))


def generate_step(
    model: Gemma3n,
    prompt: mx.array,
    cache: Optional[List[Any]] = None,
    *,
    image_features: Optional[mx.array] = None,
    audio_features: Optional[mx.array] = None,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    max_tokens: int = 256,
    prefill_step_size: int = PREFILL_CHUNK,
) -> Generator[Tuple[int, mx.array], None, None]:
    """Yield (token id, log-probabilities) for up to `max_tokens` new tokens after `prompt`
    (1-D ids). `cache` (from `model.make_cache()`) may already hold earlier turns.

    Each token is materialised before the next step is queued (the per-layer embeddings are
    read from the host by token id), so it is yielded as soon as it exists while the next
    step computes (see `DecodeStep`). When the caller stops early the cache may therefore
    already hold the last yielded token: `cache[0].offset` says how many tokens it holds."""
    cache = cache if cache is not None else model.make_cache()
    decoder = Decoder(model, cache, prompt, sampler, logits_processors)
    embeds = model.embed_inputs(prompt[None], image_features, audio_features)
    token, logprobs = decoder.choose(prefill(model, prompt[None], embeds, cache, prefill_step_size))
    for n in range(max_tokens):
        row = logprobs[0]
        mx.eval(token, row)  # before the next step is queued behind them
        token_id = token.item()
        if n + 1 < max_tokens:
            token, logprobs = decoder(token, token_id)
            mx.async_eval(token, logprobs)
        yield token_id, row
