"""Image loading and preprocessing for Gemma 3n, in numpy/PIL.

Reproduces transformers' Gemma 3n image processor (`SiglipImageProcessor`, the torchvision backend that
`"image_processor_type": "SiglipImageProcessorFast"` resolves to in transformers 5): convert to RGB,
resize to 768x768 with torchvision's antialiased uint8 *bilinear* resize, rescale by 1/255, and, as
Gemma 3n's `preprocessor_config.json` sets `do_normalize: false`, no mean/std normalisation.

Output: float32 pixel values, NCHW ``[B, 3, H, W]`` -- the layout transformers produces and the
layout `VisionTower` takes.

Conversions done by `load_image`, in order:
* EXIF orientation is applied (`ImageOps.exif_transpose`) so photos come out upright. transformers'
  own `load_image` does the same for paths; its processor does not for PIL images you pass in.
* Transparency (RGBA, LA, PA, palette or L/RGB images with a `transparency` entry) is composited
  onto white, exactly as transformers does for PIL images (`PIL.Image.alpha_composite`). numpy RGBA
  arrays take the same PIL route (transformers' own numpy path blends in float and can differ by one
  level of 255).
* Everything else (grayscale, palette, CMYK, ...) goes through `Image.convert("RGB")`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]

BILINEAR, BICUBIC = 2, 3  # PIL resample codes used in preprocessor configs


class ImageError(ValueError):
    """An image could not be read or is not usable as model input."""


# ----------------------------------------------------------------------------------------- loading


def _from_array(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8:
        raise ImageError(
            f"image array must have dtype uint8 (values 0..255), got {a.dtype}; "
            "convert it first, e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1]"
        )
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ImageError(
            f"image array must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {a.shape}"
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"image array has zero size: shape {a.shape}")
    return Image.fromarray(np.ascontiguousarray(a))  # uint8 (H, W) -> L, 3 -> RGB, 4 -> RGBA


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    if not path.is_file():
        raise ImageError(f"not a file: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncated/corrupt data fails here, not later
            return img.copy()
    except UnidentifiedImageError:
        raise ImageError(f"not an image file (or an unsupported format): {path}") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {path}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"corrupt or truncated image file: {path}: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB conversion as transformers does it: composite any transparency onto white. 16-bit
    grayscale is scaled to 8 bits first (PIL's own conversion clips it: nearly all white)."""
    if img.mode.startswith("I"):
        img = _gray16_to_8bit(img)
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def _gray16_to_8bit(img: Image.Image) -> Image.Image:
    """Modes I;16* hold 0..65535; mode I (32-bit) is read as 16-bit too, as viewers do."""
    a = np.asarray(img, dtype=np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def load_image(source: ImageSource) -> Image.Image:
    """Load a path, PIL image or uint8 numpy array (H, W[, 1|3|4]) as an upright RGB PIL image."""
    name = None
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if isinstance(name, bytes):
            name = os.fsdecode(name)
        if name.startswith(("http://", "https://")):
            raise ImageError(f"URLs are not supported, download the image first: {name}")
        img = _open(Path(name))
    elif isinstance(source, Image.Image):
        img = source
    elif isinstance(source, np.ndarray):
        img = _from_array(source)
    else:
        raise ImageError(
            f"expected an image path, PIL image or numpy array, got {type(source).__name__}"
        )
    label = name or ("<PIL image>" if isinstance(source, Image.Image) else "<array>")
    if img.width == 0 or img.height == 0:
        raise ImageError(f"image has zero size ({img.width}x{img.height}): {label}")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # unreadable EXIF: keep the stored orientation
        pass
    try:
        return to_rgb(img)
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot convert image to RGB: {label}: {e}") from None


# ------------------------------------------------------------------------------------------ resize


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


_FILTERS = {BILINEAR: (_triangle, 1.0), BICUBIC: (_cubic, 2.0)}


def _int16_weights(in_size: int, out_size: int, resample: int):
    """Per-output-pixel taps of torch's antialiased resize, as fixed-point int weights.

    Mirrors ATen's `_compute_indices_weights_aa` + `_compute_indices_int16_weights_aa` (the PIL
    algorithm torchvision runs on uint8 tensors): triangle/cubic filter stretched by the downscale
    factor, normalised per output pixel, then quantised with the largest precision that keeps the
    biggest weight within int16.
    """
    filt, support = _FILTERS[resample]
    scale = in_size / out_size
    if scale >= 1.0:
        support, invscale = support * scale, 1.0 / scale
    else:
        invscale = 1.0
    ksize = int(math.ceil(support)) * 2 + 1
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xsize = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    j = np.arange(ksize)
    w = filt((j[None, :] + xmin[:, None] - center[:, None] + 0.5) * invscale)
    w = np.where(j[None, :] < xsize[:, None], w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total != 0.0, w / np.where(total != 0.0, total, 1.0), w)
    w_max = w.max()
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    wi = np.trunc(w * (1 << precision) + np.where(w < 0, -0.5, 0.5)).astype(np.int32)
    idx = np.minimum(xmin[:, None] + j[None, :], in_size - 1)
    return idx, wi, precision


def _resample_axis(a: np.ndarray, out_size: int, axis: int, resample: int) -> np.ndarray:
    idx, wi, precision = _int16_weights(a.shape[axis], out_size, resample)
    shape = [1] * a.ndim
    shape[axis] = out_size
    acc = np.full(
        a.shape[:axis] + (out_size,) + a.shape[axis + 1 :], 1 << (precision - 1), dtype=np.int32
    )
    for k in range(idx.shape[1]):
        if not wi[:, k].any():
            continue
        acc += np.take(a, idx[:, k], axis=axis).astype(np.int32) * wi[:, k].reshape(shape)
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resize_uint8(image: np.ndarray, size: tuple[int, int], resample: int = BILINEAR) -> np.ndarray:
    """Resize an (H, W, C) uint8 image like `torchvision.transforms.v2.functional.resize(antialias=True)`
    on a uint8 tensor: horizontal pass then vertical pass, each rounded to uint8."""
    if resample not in _FILTERS:
        raise NotImplementedError(f"resample={resample} (only 2=bilinear and 3=bicubic are implemented)")
    h, w = size
    if image.shape[1] != w:
        image = _resample_axis(image, w, 1, resample)
    if image.shape[0] != h:
        image = _resample_axis(image, h, 0, resample)
    return image


# --------------------------------------------------------------------------------------- processor


@dataclass
class ImageProcessor:
    """Gemma 3n image preprocessing; defaults are those of Gemma 3n's `preprocessor_config.json`.

    Images are always converted to RGB (`load_image`), whatever `do_convert_rgb` says: saved Gemma 3n
    configs may carry `"do_convert_rgb": null`, with which transformers 5 skips the conversion and hands
    1- or 4-channel pixel values to a tower that takes 3.
    """

    size: tuple[int, int] = (768, 768)  # (height, width)
    do_resize: bool = True
    resample: int = BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # unused config keys

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageProcessor":
        kw: dict[str, Any] = {}
        size = d.get("size")
        if size is not None:
            if isinstance(size, dict):
                if "height" not in size or "width" not in size:
                    raise NotImplementedError(
                        f"only size={{'height', 'width'}} is supported, got {size}"
                    )
                kw["size"] = (int(size["height"]), int(size["width"]))
            elif isinstance(size, int):
                kw["size"] = (size, size)
            else:
                kw["size"] = (int(size[0]), int(size[1]))
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if d.get(key) is not None:
                kw[key] = bool(d[key])
        if d.get("resample") is not None:
            kw["resample"] = int(d["resample"])
        if d.get("rescale_factor") is not None:
            kw["rescale_factor"] = float(d["rescale_factor"])
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                v = d[key]
                kw[key] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
        kw["extra"] = {k: v for k, v in d.items() if k not in kw}
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ImageProcessor":
        """Read `preprocessor_config.json` from a checkpoint directory (Gemma 3n defaults if absent)."""
        p = Path(path) / "preprocessor_config.json"
        return cls.from_dict(json.loads(p.read_text())) if p.exists() else cls()

    def preprocess_one(self, source: ImageSource) -> np.ndarray:
        """One image -> float32 [3, H, W]."""
        a = np.asarray(load_image(source))
        if self.do_resize:
            a = resize_uint8(a, self.size, self.resample)
        x = a.astype(np.float32)
        if self.do_rescale and self.do_normalize:  # fused like transformers: (x - m/r) / (s/r)
            mean = np.float32(1.0 / self.rescale_factor) * np.asarray(self.image_mean, np.float32)
            std = np.float32(1.0 / self.rescale_factor) * np.asarray(self.image_std, np.float32)
            x = (x - mean) / std
        elif self.do_rescale:
            x = x * np.float32(self.rescale_factor)
        elif self.do_normalize:
            x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def __call__(self, images: ImageSource | Sequence[ImageSource]) -> np.ndarray:
        """One image or a list of images -> float32 pixel values [B, 3, H, W] (NCHW)."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise ImageError("no images given")
            items = list(images)
        else:
            items = [images]
        out = [self.preprocess_one(im) for im in items]
        shapes = {o.shape for o in out}
        if len(shapes) > 1:
            raise ImageError(
                f"images have different sizes after preprocessing ({shapes}); enable do_resize"
            )
        return np.stack(out)
