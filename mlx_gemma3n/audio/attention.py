"""Chunked local self-attention of the USM Conformer, with Transformer-XL relative positions.

The sequence is cut into blocks of W = `conf_attention_chunk_size` queries. Each block attends
to a context of C = P + W + R keys: the P = context_left - 1 steps before the block, the block
itself and R = context_right steps after it, further restricted per query to the keys at
offsets [-P, R] from it. With the defaults (W=12, P=12, R=0) every step sees itself and the 12
steps before it, so attention cost grows linearly with length.
"""

import math

import mlx.core as mx
import mlx.nn as nn

from .config import AudioConfig


class RelativePositionEmbedding(nn.Module):
    """Adds to the content logits q.k the position logits q.r(query - key), where r projects a
    sinusoid of the distance; distances come from P down to -R."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.num_heads = config.conf_num_attention_heads
        self.hidden_size = config.hidden_size
        self.max_backward = max(0, config.conf_attention_context_left - 1)
        self.max_forward = config.conf_attention_context_right
        self.pos_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)

    def _sinusoids(self) -> mx.array:
        """[F, hidden] timing signals for distances P, P-1, ..., -R (F = P + R + 1)."""
        num_timescales = self.hidden_size // 2
        log_increment = math.log(1.0e4) / max(num_timescales - 1, 1)
        inv_timescales = mx.exp(mx.arange(num_timescales, dtype=mx.float32) * -log_increment)
        distance = mx.arange(self.max_backward, -self.max_forward - 1, -1, dtype=mx.float32)
        scaled = distance[:, None] * inv_timescales[None, :]
        return mx.concatenate([mx.sin(scaled), mx.cos(scaled)], axis=-1)

    def __call__(self, queries: mx.array, keys: mx.array) -> mx.array:
        """queries [B, U, W, N, H], keys [B, U, C, N, H] -> logits [B, N, U, W, C]."""
        b, u, w, n, h = queries.shape
        c = keys.shape[2]
        r = self.pos_proj(self._sinusoids().astype(queries.dtype))
        num_distances = r.shape[0]
        q = queries.transpose(0, 3, 1, 2, 4)  # [B, N, U, W, H]
        content = q @ keys.transpose(0, 3, 1, 4, 2)
        position = q @ r.reshape(num_distances, n, h).transpose(1, 2, 0)[:, None]  # [B, N, U, W, F]
        return content + _relative_shift(position, c)


def _relative_shift(x: mx.array, context: int) -> mx.array:
    """[..., W, F] logits by distance -> [..., W, C] logits by key slot.

    Query w's logit for key slot c is x[w, c - w] (0 <= c - w < F), and 0 elsewhere: padding
    each row to C + 1 and re-reading the flat buffer as rows of C moves row w right by w.
    """
    *lead, w, f = x.shape
    x = mx.pad(x, [(0, 0)] * (len(lead) + 1) + [(0, context + 1 - f)])
    x = x.reshape(*lead, w * (context + 1))[..., : w * context]
    return x.reshape(*lead, w, context)


class LocalAttention(nn.Module):
    """Multi-head chunked local attention; returns [B, T, N, H] (heads not yet merged)."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.num_heads = config.conf_num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.chunk_size = config.conf_attention_chunk_size
        self.max_past = max(0, config.conf_attention_context_left - 1)
        self.max_future = config.conf_attention_context_right
        self.context_size = self.chunk_size + self.max_past + self.max_future
        self.logit_cap = config.conf_attention_logit_cap

        self.relative_position_embedding = RelativePositionEmbedding(config)
        # softplus(0) = ln 2 rescales so that the zero-initialised per_dim_scale means 1/sqrt(H).
        self.per_dim_scale = mx.zeros((self.head_dim,))
        self._q_scale = self.head_dim**-0.5 / math.log(2.0)
        dims = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, dims, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, dims, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, dims, bias=False)

    def _window_mask(self) -> mx.array:
        """[W, C]: True where key slot c is within [-P, R] steps of query w."""
        offset = mx.arange(self.context_size)[None, :] - mx.arange(self.chunk_size)[:, None]
        return (offset >= 0) & (offset <= self.max_past + self.max_future)

    def _to_blocks(self, x: mx.array) -> mx.array:
        """[B, T, ...] -> [B, U, W, ...], zero-padding T up to U * W."""
        t = x.shape[1]
        num_blocks = -(-t // self.chunk_size)
        x = _pad_time(x, 0, num_blocks * self.chunk_size - t)
        return x.reshape(x.shape[0], num_blocks, self.chunk_size, *x.shape[2:])

    def _to_contexts(self, x: mx.array) -> mx.array:
        """[B, T, ...] -> [B, U, C, ...]: block u's keys are steps u*W - P .. u*W + W + R - 1."""
        t = x.shape[1]
        num_blocks = -(-t // self.chunk_size)
        x = _pad_time(x, self.max_past, self.max_future + self.chunk_size - 1)
        starts = mx.arange(num_blocks)[:, None] * self.chunk_size
        index = (starts + mx.arange(self.context_size)[None, :]).reshape(-1)
        x = mx.take(x, index, axis=1)
        return x.reshape(x.shape[0], num_blocks, self.context_size, *x.shape[2:])

    def __call__(self, x: mx.array, padding_mask: mx.array) -> mx.array:
        """x [B, T, D], padding_mask [B, T] (True = padding) -> [B, T, N, H]."""
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).reshape(shape) * (self._q_scale * nn.softplus(self.per_dim_scale))
        k = self.k_proj(x).reshape(shape)
        v = self.v_proj(x).reshape(shape)

        logits = self.relative_position_embedding(self._to_blocks(q), self._to_contexts(k))
        logits = mx.tanh(logits / self.logit_cap) * self.logit_cap
        valid = self._to_contexts(~padding_mask)[:, None, :, None, :] & self._window_mask()
        # The finite minimum, not -inf: fully masked rows (queries in padding) stay finite.
        logits = mx.where(valid, logits, mx.finfo(logits.dtype).min)
        probs = mx.softmax(logits, axis=-1, precise=True)

        context = probs @ self._to_contexts(v).transpose(0, 3, 1, 2, 4)  # [B, N, U, W, H]
        context = context.transpose(0, 2, 3, 1, 4).reshape(b, -1, self.num_heads, self.head_dim)
        return context[:, :t]


def _pad_time(x: mx.array, before: int, after: int) -> mx.array:
    return mx.pad(x, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))
