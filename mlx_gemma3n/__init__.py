"""Gemma 3n (text, image and audio in; text out) with MLX.

    import mlx_gemma3n
    model, processor = mlx_gemma3n.load("google/gemma-3n-E2B-it")
    print(mlx_gemma3n.generate(model, processor, "Why is the sky blue?"))
"""

from .api import (
    ChatSession,
    GenerationResponse,
    PromptCache,
    SamplingOptions,
    generate,
    load,
    stream_generate,
)
from .processor import Processor, user_message

__all__ = [
    "ChatSession",
    "GenerationResponse",
    "Processor",
    "PromptCache",
    "SamplingOptions",
    "generate",
    "load",
    "stream_generate",
    "user_message",
]
