"""Projects vision/audio soft tokens (or their hard-token ids) into the text embedding space."""

import mlx.core as mx
import mlx.nn as nn

from .text.norm import RMSNorm


class MultimodalEmbedder(nn.Module):
    def __init__(self, dims: int, text_dims: int, vocab_size: int, vocab_offset: int, eps: float):
        super().__init__()
        self.vocab_offset = vocab_offset
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, dims)
        self.hard_embedding_norm = RMSNorm(dims, eps)
        self.soft_embedding_norm = RMSNorm(dims, eps)
        self.embedding_projection = nn.Linear(dims, text_dims, bias=False)
        self.embedding_post_projection_norm = RMSNorm(text_dims, eps, with_scale=False)

    def _project(self, x: mx.array) -> mx.array:
        return self.embedding_post_projection_norm(self.embedding_projection(x))

    def embed_ids(self, input_ids: mx.array) -> mx.array:
        """Hard tokens: ids in [vocab_offset, vocab_offset + vocab_size)."""
        return self._project(self.hard_embedding_norm(self.embedding(input_ids - self.vocab_offset)))

    def embed_soft(self, features: mx.array) -> mx.array:
        """Soft tokens: encoder outputs."""
        return self._project(self.soft_embedding_norm(features))
