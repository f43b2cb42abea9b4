"""Hugging Face Gemma 3n checkpoint -> MLX checkpoint (`python -m convert --help`)."""

from .converter import convert

__all__ = ["convert"]
