"""Gemma 3n (text, image and audio in; text out) with MLX."""

from .loading import load

__all__ = ["load"]
