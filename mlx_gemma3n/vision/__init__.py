"""Gemma 3n image input: preprocessing, the MobileNet-V5 vision tower and prompt expansion."""

from .config import VisionConfig
from .encoder import VisionTower
from .processor import ImageError, ImageProcessor, load_image
from .prompt import (
    expand_image_placeholders,
    full_image_sequence,
)

__all__ = [
    "VisionConfig",
    "VisionTower",
    "ImageError",
    "ImageProcessor",
    "load_image",
    "expand_image_placeholders",
    "full_image_sequence",
]
