"""A synthetic context in the KV caches, for benchmarks that time or count one step late in a
long prompt without prefilling it (what the keys and values hold does not change the work).
Shared so that every benchmark leaves the caches in the same state for the same kind of step."""

import mlx.core as mx


def fill_cache(cache: list, n_kv_heads: int, head_dim: int, context: int, dtype: mx.Dtype,
               last_alone: bool = False) -> None:
    """`context` random positions in every cache, as one prefill chunk leaves them (the state a
    prefill chunk or the first decode step after a prompt starts from). With `last_alone`, the
    last position goes in by itself, as a decode step leaves it (the state later decode steps
    start from)."""
    k, v = (mx.random.normal((1, n_kv_heads, max(context, 0), head_dim)).astype(dtype) for _ in range(2))
    parts = [(0, context - 1), (context - 1, context)] if last_alone else [(0, context)]
    for c in cache:
        for start, stop in parts:
            if stop > start:
                c.update_and_fetch(k[:, :, start:stop], v[:, :, start:stop])
    mx.eval([x for c in cache for x in (c.keys, c.values) if x is not None])
