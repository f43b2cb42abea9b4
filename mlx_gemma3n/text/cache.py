"""Fixed-shape KV caches for the compiled decode step.

The caches stay mlx-lm's `KVCache` (full attention) and `RotatingKVCache` (sliding window):
prefill, prompt-cache files and chat continuation use them as they are. For a decode step,
`fit` gives each one a buffer whose shape does not change from step to step (the sliding
window's `max_size`; a multiple of 256 slots for full attention) and says where the token
goes, so that the step can be one `mx.compile`d call: inside it a `StepCache` writes the
token at an array index and masks the unused slots, and the host only advances the offsets.
"""

from typing import Any, List, Tuple

import mlx.core as mx

from ..mlx_lm_parts import cache as mlx_lm_cache

def _zeros_like_slots(buffer: mx.array, n: int) -> mx.array:
    B, H, _, D = buffer.shape
    return mx.zeros((B, H, n, D), buffer.dtype)


def _fit_full(c) -> None:
    if c.offset >= c.keys.shape[2]:  # grown by mlx-lm's own step (256 slots)
        c.keys, c.values = (
            mx.concatenate([b[..., : c.offset, :], _zeros_like_slots(b, c.step)], axis=2)
            for b in (c.keys, c.values)
        )


def _fit_sliding(c) -> int:
    window, size = c.max_size, c.keys.shape[2]
    if size > window:  # after a prefill chunk: the window's last positions, oldest first
        c.keys, c.values = (c._temporal_order(b)[..., -window:, :] for b in (c.keys, c.values))
        c._idx = 0
    elif size < window:  # not yet full: positions 0 .. offset-1 in order
        c.keys, c.values = (
            mx.concatenate([b[..., : c.offset, :], _zeros_like_slots(b, window - c.offset)], axis=2)
            for b in (c.keys, c.values)
        )
        c._idx = c.offset
    return c._idx % window  # mlx-lm's ring: _idx == max_size means "next write at 0"


def fit(caches: List[Any]) -> int:
    """Make every cache's buffer fixed-shape and free for one more token; returns the slot
    of the next token in the sliding-window buffers (all of them hold the same positions; in
    a full-attention buffer the slot is the offset)."""
    slot = 0
    for c in caches:
        if isinstance(c, mlx_lm_cache.RotatingKVCache):
            slot = _fit_sliding(c)
        else:
            _fit_full(c)
    return slot


def advance(caches: List[Any], buffers: List[mx.array], sliding_slot: int) -> None:
    """Store the step's updated buffers (K, V per cache) and count the token in."""
    for i, c in enumerate(caches):
        c.keys, c.values = buffers[2 * i], buffers[2 * i + 1]
        c.offset += 1
        if isinstance(c, mlx_lm_cache.RotatingKVCache):
            c._idx = sliding_slot + 1


def buffers(caches: List[Any]) -> List[mx.array]:
    return [b for c in caches for b in (c.keys, c.values)]


class StepCache:
    """One layer's cache inside the traced decode step: the fixed-size K/V buffers, the
    position (`offset`, an array, for RoPE and the mask) and the slot the token goes to."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array, slot: mx.array):
        self.keys, self.values, self.offset, self.slot = keys, values, offset, slot

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, keys, self.slot, axes=(2,))
        self.values = mx.slice_update(self.values, values, self.slot, axes=(2,))
        return self.keys, self.values

    def make_mask(self, N: int, window_size=None, return_array: bool = False) -> mx.array:
        """Slots holding a position up to the current one. A sliding buffer fills slots in
        order until it is full, after which every slot is in the window."""
        return mx.arange(self.keys.shape[2]) <= self.offset
