"""Token generation: chunked prefill over the caches, then one token per step."""

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Generator, List, NamedTuple, Optional, Tuple

import mlx.core as mx
import numpy as np

from .kernels import kernel_setting
from .model import Gemma3n
from .text import cache as step_cache
from .text.ple import StoredRow, in_place_reads_work

# Prompt tokens per prefill step. Activations grow linearly with it (E4B at a 2K context,
# float32: +108 MB over the weights at 256, +213 MB at 512) while the work per token does not,
# and E4B's 4-bit weights alone leave ~0.2 GB under its 2.8 GB budget.
PREFILL_CHUNK = 256

# Prefill work queued ahead of the host, in layers. A GPU backend keeps every buffer that a
# queued graph reads alive until the graph has run, so what is queued is what is resident:
# with whole chunks queued, MLX-CUDA's peak at a 2K prompt was 0.74 (E2B) / 0.93 GiB (E4B)
# over the weights (H100, bfloat16). Two layers keep the GPU fed while the host builds the
# next: an E2B layer of a 256-token chunk took the H100 ~1.4 ms, building one takes this
# 2-core CPU ~0.5 ms.
PREFILL_DEPTH = 2
# The unit of PREFILL_DEPTH: each layer of a chunk ("layer") or each whole chunk ("chunk",
# fewer commits and waits, more resident). A GPU's choice between them is measured by
# `bench/worker.py --prefill-variants`.
PREFILL_UNIT = "layer"

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


class InFlight:
    """Evaluations queued with `mx.async_eval`, at most `depth` of them unfinished when a call
    returns: each call queues its arrays, then waits for the oldest ones beyond `depth`."""

    def __init__(self, depth: int):
        self.depth = depth
        self.queue = deque()

    def __call__(self, arrays: List[mx.array]) -> None:
        mx.async_eval(arrays)
        self.queue.append(arrays)
        while len(self.queue) > self.depth:
            mx.eval(self.queue.popleft())


@contextmanager
def uncached_on_cpu():
    """On the CPU backend, MLX's buffer cache off inside (restored after): there it only
    doubles the C allocator's own retention of freed buffers (E4B, 1920 + 8 tokens: peak RSS
    2.79 GB instead of 2.84, prefill no slower). An accelerator keeps its cache: it saves
    device allocations, and MLX's peak memory does not count it."""
    if mx.default_device() != mx.cpu:
        yield
        return
    limit = mx.set_cache_limit(0)
    try:
        yield
    finally:
        mx.set_cache_limit(limit)


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

    The KV-shared layers (the last third or so) write no cache: they run for the prompt's
    last position alone, whose logits are all that is needed (-20% prefill time), at the end
    of the last chunk; the chunks before build only the layers that write a cache.

    Each layer of a chunk is queued (`mx.async_eval`) as it is built, and the host waits for
    the layer `PREFILL_DEPTH` before it, so that the device computes while the host builds,
    and what is in flight stays a few layers' activations (`PREFILL_UNIT` "chunk": whole
    chunks instead of layers). The next chunk's per-layer rows are read from the file on a
    thread meanwhile: a read at the chunk's end would outlast the few layers queued."""
    lm = model.language_model
    n = inputs_embeds.shape[1]
    if n == 0:
        raise ValueError("the prompt is empty: give at least one token")
    ids = np.array(input_ids)
    spans = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    in_flight = InFlight(PREFILL_DEPTH)
    pace = in_flight if PREFILL_UNIT == "layer" else None
    with ThreadPoolExecutor(1, thread_name_prefix="ple-rows") as reader, uncached_on_cpu():
        reading = reader.submit(lm.read_per_layer_rows, ids[:, slice(*spans[0])])
        for k, (start, end) in enumerate(spans):
            rows = reading.result()
            if k + 1 < len(spans):
                reading = reader.submit(lm.read_per_layer_rows, ids[:, slice(*spans[k + 1])])
            per_layer = lm.per_layer_embeddings_of(rows)
            if end == n:
                hidden = lm(inputs_embeds[:, start:end], per_layer, cache, pace=pace, outputs="last")
                return model.logits(hidden[:, -1, :])
            lm(inputs_embeds[:, start:end], per_layer, cache, pace=pace, outputs="none")
            in_flight([c.state for c in cache])


class _CompiledSteps:
    """A model's compiled decode steps, one per kernel setting. Kept on the model, not on a
    `DecodeStep`: a new `mx.compile` traces anew, and every request makes a DecodeStep (a
    trace costs 0.2-0.6 s for E2B/E4B on MLX-CPU)."""

    def __init__(self):
        self.by_setting = {}


def _forward(model: Gemma3n, sliding: Tuple[bool, ...], n_row_parts: int, ids, offset, sliding_slot, *arrays):
    lm = model.language_model
    stored_row, buffers = arrays[:n_row_parts], arrays[n_row_parts:]
    per_layer = lm.scale_per_layer_rows(lm.ple_table.from_stored(stored_row))[None]
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
        n_row_parts = len(model.language_model.ple_table.parts)
        steps.by_setting[setting] = mx.compile(partial(_forward, model, sliding, n_row_parts))
    return steps.by_setting[setting]


class Built(NamedTuple):
    """A decode step queued in no stream yet: `DecodeStep.build`, then `commit`."""

    logits: mx.array
    buffers: List[mx.array]
    sliding_slot: int
    row: Optional[StoredRow]


class DecodeStep:
    """One decode step as a single compiled call over fixed-shape caches (text/cache.py).

    Building a step in Python costs milliseconds of host time per token (thousands of
    array operations). Compiled, the graph is traced once (again only when the full-attention
    buffers grow, every 256 tokens) and a step is a replay. The replay still costs host time,
    so `build` makes it before the token it follows is known (the token may be the lazy
    output of the step before): the token's per-layer embedding row, which the host reads
    from the file by id, goes into `StoredRow` arrays in place when `commit` is called with
    the id. Where the device cannot see such writes (`ahead` false) a step reads its row
    first (`__call__`).

    Tokens outside the text vocabulary (multimodal ids, which need their embedder) take the
    uncompiled path; both write the same caches."""

    def __init__(self, model: Gemma3n, cache: List[Any]):
        self.model, self.cache = model, cache
        self.text_vocab = model.config.text_config.vocab_size_per_layer_input
        self.table = model.language_model.ple_table
        sliding = tuple(isinstance(c, step_cache.mlx_lm_cache.RotatingKVCache) for c in cache)
        self._compiled = _compiled_step(model, sliding) if self.table is not None else None
        self.ahead = self.table is not None and in_place_reads_work()
        # One is enough: a row is read in for a step once the token it follows is known,
        # that is once the step before, the only other reader, has run.
        self._row = StoredRow(self.table) if self.ahead else None

    def build(self, token: mx.array, stored_row: Optional[List[mx.array]] = None) -> Built:
        """The step after `token` ([1], evaluated or not), not yet runnable: `commit` it with
        the token's id. With `stored_row` (the row already read) it reads that instead."""
        row = None
        if stored_row is None:
            row, stored_row = self._row, self._row.arrays
        slot = step_cache.fit(self.cache)
        offset = mx.array(self.cache[0].offset, dtype=mx.int32)
        ids = token.reshape(1, 1).astype(mx.int32)
        logits, *buffers = self._compiled(
            ids, offset, mx.array([slot], dtype=mx.int32), *stored_row, *step_cache.buffers(self.cache)
        )
        return Built(logits, buffers, slot, row)

    def commit(self, built: Built, token_id: int) -> bool:
        """Read the token's row and count the step's token into the caches; False (nothing
        done) for an id outside the text vocabulary, whose step must be run uncompiled."""
        if not 0 <= token_id < self.text_vocab:
            return False
        if built.row is not None:
            built.row.read(token_id)
        step_cache.advance(self.cache, built.buffers, built.sliding_slot)
        return True

    def __call__(self, token_id: int) -> mx.array:
        """The logits [1, vocab] after `token_id` (lazy), its row read first; the caches hold
        the token afterwards."""
        if self._compiled is not None and 0 <= token_id < self.text_vocab:
            built = self.build(mx.array([token_id]), self.table.stored_rows(np.array([token_id])))
            self.commit(built, token_id)
            return built.logits
        return self.model(mx.array([[token_id]]), cache=self.cache)[:, -1, :]


class Ahead(NamedTuple):
    """The next step and its sampling, built before the token it follows is known."""

    step: Built
    history: mx.array
    token: mx.array
    logprobs: mx.array


class Decoder:
    """Sampling after a prefill: `choose` turns logits into (token, log-probabilities).
    `prepare` builds the step after a token that may still be computing, `dispatch` makes
    it runnable once the token's id is known, and returns the next (token, log-probabilities),
    lazy."""

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

    def choose(self, logits: mx.array, history: Optional[mx.array] = None) -> Tuple[mx.array, mx.array]:
        if self.unembeddable is not None:
            logits = mx.where(self.unembeddable, -mx.inf, logits)
        for processor in self.processors:
            logits = processor(self.history if history is None else history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return self.sampler(logprobs), logprobs

    def _extended(self, token: mx.array) -> mx.array:
        return mx.concatenate([self.history, token]) if self.processors else self.history

    def prepare(self, token: mx.array) -> Optional[Ahead]:
        """The step after `token` ([1], possibly not yet evaluated) and its sampling, built
        now so that its host work overlaps the evaluation of `token`; None where steps
        cannot be built ahead (`DecodeStep.ahead`)."""
        if not self.step.ahead:
            return None
        history = self._extended(token)
        built = self.step.build(token)
        return Ahead(built, history, *self.choose(built.logits, history))

    def dispatch(self, ahead: Optional[Ahead], token: mx.array, token_id: int) -> Tuple[mx.array, mx.array]:
        """The (token, log-probabilities) after `token` ([1], evaluated; `token_id`), lazy:
        `ahead`'s if it was prepared for this token and can run compiled, else built now."""
        if ahead is not None and self.step.commit(ahead.step, token_id):
            self.history = ahead.history
            return ahead.token, ahead.logprobs
        self.history = self._extended(token)
        return self.choose(self.step(token_id))


def yields_before_queueing() -> bool:
    """Whether `generate_step` yields a token before queueing the next step: on the CPU
    backend, where queueing runs most of the step (MLX-CPU's `mx.async_eval` blocks while
    more than a few dozen tasks are pending), so that a token is not held back for a step's
    time. An accelerator computes the queued step while the caller takes the token."""
    return mx.default_device() == mx.cpu


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

    Each token is materialised before the next step is queued (that step needs the token's
    per-layer embedding row, read on the host by id), but the step itself was built while the
    token was computing (`Decoder.prepare`), so between the two the host only reads the row.
    On an accelerator a token is yielded once the next step is queued, so that the step
    computes while the caller takes the token; on the CPU backend before
    (`yields_before_queueing`). When the caller stops early the cache may therefore hold the
    last yielded token or not: `cache[0].offset` says how many tokens it holds."""
    cache = cache if cache is not None else model.make_cache()
    decoder = Decoder(model, cache, prompt, sampler, logits_processors)
    embeds = model.embed_inputs(prompt[None], image_features, audio_features)
    token, logprobs = decoder.choose(prefill(model, prompt[None], embeds, cache, prefill_step_size))
    mx.async_eval(token, logprobs)
    ahead = decoder.prepare(token) if max_tokens > 1 else None
    first = yields_before_queueing()
    for n in range(max_tokens):
        row = logprobs[0]
        mx.eval(token, row)
        token_id = token.item()
        last = n + 1 == max_tokens
        if first or last:
            yield token_id, row
        if last:
            return
        token, logprobs = decoder.dispatch(ahead, token, token_id)
        mx.async_eval(token, logprobs)
        if not first:
            yield token_id, row
        if n + 2 < max_tokens:
            ahead = decoder.prepare(token)
