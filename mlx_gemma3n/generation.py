"""Token generation: chunked prefill over the caches, then one token per step."""

from typing import Any, Callable, Generator, List, Optional, Tuple

import mlx.core as mx

from .model import Gemma3n

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def prefill(
    model: Gemma3n,
    inputs_embeds: mx.array,
    per_layer_embeds: mx.array,
    cache: List[Any],
    chunk_size: int = 512,
) -> mx.array:
    """Run the prompt through the model in chunks of `chunk_size` tokens, filling `cache`;
    returns the logits of the last position ([B, vocab]). Chunking bounds the attention
    score matrix and the activations to chunk_size rows however long the prompt is."""
    length = inputs_embeds.shape[1]
    start = 0
    while length - start > chunk_size:
        end = start + chunk_size
        model.language_model(inputs_embeds[:, start:end], per_layer_embeds[:, start:end], cache)
        mx.eval([c.state for c in cache])
        start = end
    hidden = model.language_model(inputs_embeds[:, start:], per_layer_embeds[:, start:], cache)
    return model.logits(hidden[:, -1, :])


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
    prefill_step_size: int = 512,
) -> Generator[Tuple[int, mx.array], None, None]:
    """Yield (token id, log-probabilities) for up to `max_tokens` new tokens after `prompt`
    (1-D ids). `cache` (from `model.make_cache()`) may already hold earlier turns.

    Each token is materialised before the next step is queued (the per-layer embeddings are
    read from the host by token id anyway), so it is yielded as soon as it exists while the
    next step computes. When the caller stops early the cache may therefore already hold the
    last yielded token: `cache[0].offset` says how many tokens it holds."""
    sampler = sampler or greedy
    cache = cache if cache is not None else model.make_cache()
    history = prompt

    def choose(logits: mx.array) -> Tuple[mx.array, mx.array]:
        for processor in logits_processors or []:
            logits = processor(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs

    embeds, per_layer = model.embed_inputs(prompt[None], image_features, audio_features)
    token, logprobs = choose(prefill(model, embeds, per_layer, cache, prefill_step_size))
    for n in range(max_tokens):
        row = logprobs[0]
        mx.eval(token, row)  # before the next step is queued behind them
        token_id = token.item()
        if n + 1 < max_tokens:
            history = mx.concatenate([history, token])
            token, logprobs = choose(model(token[None], cache=cache)[:, -1, :])
            mx.async_eval(token, logprobs)
        yield token_id, row
