"""ImageProcessor / load_image vs transformers' Gemma 3n image processor.

transformers resolves Gemma 3n's `"image_processor_type": "SiglipImageProcessorFast"` to the torchvision
`SiglipImageProcessor`: uint8 antialiased bilinear resize to 768x768, x/255, no normalisation. Our numpy
port of that resize is bit-exact, so every comparison below is exact (max abs diff 0.0), except the
documented numpy-RGBA case (transformers' float blend vs its own PIL composite: <= 1/255).
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mlx_gemma3n.vision import ImageError, ImageProcessor, load_image

torch.set_num_threads(1)

# Gemma 3n's preprocessor_config.json (image part). Saved configs may carry "do_convert_rgb": null,
# which transformers 5 honours by skipping RGB conversion (grayscale -> 1 channel, RGBA -> 4 channels:
# inputs the vision tower cannot take). ImageProcessor always converts, i.e. compares to `True`.
GEMMA3N_PREPROCESSOR = {
    "do_convert_rgb": True,
    "do_normalize": False,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessorFast",
    "image_seq_length": 256,
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Gemma3nProcessor",
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 768, "width": 768},
}


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    from transformers import AutoImageProcessor

    d = tmp_path_factory.mktemp("preproc")
    (d / "preprocessor_config.json").write_text(json.dumps(GEMMA3N_PREPROCESSOR))
    hf = AutoImageProcessor.from_pretrained(d)
    assert type(hf).__name__ == "SiglipImageProcessor"  # torchvision backend
    return ImageProcessor.from_pretrained(d), hf


def hf_pixels(hf, images) -> np.ndarray:
    return hf(images, return_tensors="pt")["pixel_values"].numpy()


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: resizing has to get both edges and textures right."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * 3 + yy * 5) % 256], -1)
    return np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)


def test_defaults_are_gemma3n(processors):
    mine, _ = processors
    assert mine.size == (768, 768) and mine.resample == 2 and not mine.do_normalize
    assert ImageProcessor() == ImageProcessor.from_dict(GEMMA3N_PREPROCESSOR)


@pytest.mark.parametrize("h,w", [(480, 640), (1200, 900), (37, 1000), (7, 5), (768, 768)])
def test_rgb_sizes_exact(processors, tmp_path, h, w):
    mine, hf = processors
    path = tmp_path / "rgb.png"
    Image.fromarray(photo(h, w)).save(path)
    out = mine(path)
    assert out.shape == (1, 3, 768, 768) and out.dtype == np.float32
    np.testing.assert_array_equal(out, hf_pixels(hf, Image.open(path)))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "P+transparency", "CMYK", "I;16"])
def test_modes_exact(processors, tmp_path, mode):
    mine, hf = processors
    rgb = photo(300, 500, seed=3)
    alpha = np.tile(np.linspace(0, 255, 500).astype(np.uint8), (300, 1))
    if mode == "RGBA":
        img = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    elif mode == "LA":
        img = Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")
    elif mode == "L":
        img = Image.fromarray(rgb[..., 1], "L")
    elif mode == "CMYK":
        img = Image.fromarray(rgb).convert("CMYK")
    elif mode == "I;16":
        img = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)  # 16-bit grayscale, full range
    else:
        img = Image.fromarray(rgb).quantize(64)
        if mode == "P+transparency":
            img.info["transparency"] = 5
    path = tmp_path / ("img.tiff" if mode in ("CMYK", "I;16") else "img.png")
    img.save(path)
    reopened = Image.open(path)
    if mode == "I;16":  # scaled to 8 bits as a viewer shows it (transformers clips: all but white)
        reopened = Image.fromarray(np.rint(np.asarray(reopened) / 257).astype(np.uint8))
    out = mine(path)
    np.testing.assert_array_equal(out, hf_pixels(hf, reopened))
    if mode in ("RGBA", "LA"):  # the fully transparent left edge is composited onto white
        assert (out[0, :, :, 0] == 1.0).all()
    if mode == "P+transparency":
        transparent = np.asarray(reopened) == 5
        assert transparent.any() and (np.asarray(load_image(path))[transparent] == 255).all()


def test_exif_orientation_applied(processors, tmp_path):
    mine, hf = processors
    from transformers.image_utils import load_image as hf_load_image

    pixels = photo(240, 320, seed=4)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    stored = np.asarray(Image.open(path).convert("RGB"))
    upright = load_image(path)
    assert upright.size == (240, 320)  # (W, H): portrait once rotated
    np.testing.assert_array_equal(np.asarray(upright), np.rot90(stored, k=-1))
    # transformers' own load_image applies the EXIF orientation as well
    np.testing.assert_array_equal(mine(path), hf_pixels(hf, hf_load_image(str(path))))
    np.testing.assert_array_equal(mine(Image.open(path)), mine(path))


def test_numpy_inputs(processors):
    mine, hf = processors
    rgb = photo(333, 222, seed=5)
    np.testing.assert_array_equal(mine(rgb), hf_pixels(hf, rgb))
    np.testing.assert_array_equal(mine(rgb[..., 0]), hf_pixels(hf, rgb[..., :1]))  # (H, W) == (H, W, 1)
    np.testing.assert_array_equal(mine(rgb[..., :1]), hf_pixels(hf, rgb[..., :1]))
    rgba = np.dstack([rgb, np.tile(np.linspace(0, 255, 222).astype(np.uint8), (333, 1))])
    # RGBA arrays take the PIL route (== transformers on the same image as PIL) ...
    np.testing.assert_array_equal(mine(rgba), hf_pixels(hf, Image.fromarray(rgba, "RGBA")))
    # ... transformers' own array route blends in float: measured max diff 1/255
    assert np.abs(mine(rgba) - hf_pixels(hf, rgba)).max() <= 1 / 255 + 1e-6


def test_batch(processors):
    mine, hf = processors
    images = [photo(100, 150, seed=6), Image.fromarray(photo(900, 400, seed=7))]
    out = mine(images)
    assert out.shape == (2, 3, 768, 768)
    np.testing.assert_array_equal(out, hf_pixels(hf, images))


def test_normalize_and_bicubic_configs(processors):
    from transformers import SiglipImageProcessor

    cfg = dict(GEMMA3N_PREPROCESSOR, do_normalize=True, resample=3, size={"height": 224, "width": 320})
    img = Image.fromarray(photo(500, 700, seed=8))
    out = ImageProcessor.from_dict(cfg)(img)
    ref = hf_pixels(
        SiglipImageProcessor(**{k: v for k, v in cfg.items() if k != "image_processor_type"}), img
    )
    assert out.shape == (1, 3, 224, 320)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------- bad inputs


def test_errors_name_the_file(tmp_path):
    assert issubclass(ImageError, ValueError)
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="not found.*nope.png"):
        load_image(missing)
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("definitely not pixels")
    with pytest.raises(ImageError, match="not an image.*notes.png"):
        load_image(str(text))
    good = tmp_path / "good.png"
    Image.fromarray(photo(64, 64)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ImageError, match="corrupt.*broken.png"):
        load_image(broken)
    jpg = tmp_path / "good.jpg"
    Image.fromarray(photo(64, 64)).save(jpg)
    garbled = tmp_path / "garbled.jpg"
    garbled.write_bytes(jpg.read_bytes()[:200])
    with pytest.raises(ImageError, match="garbled.jpg"):
        load_image(garbled)
    with pytest.raises(ImageError, match="URL"):
        load_image("https://example.com/cat.png")


def test_bad_arrays_and_types():
    with pytest.raises(ImageError, match="zero size"):
        load_image(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="dtype uint8"):
        load_image(np.zeros((8, 8, 3), np.float32))
    for shape in [(8, 8, 2), (3, 16, 16), (1, 8, 8, 3), (8,)]:
        with pytest.raises(ImageError, match="shape"):
            load_image(np.zeros(shape, np.uint8))
    with pytest.raises(ImageError, match="int"):
        load_image(42)
    with pytest.raises(ImageError, match="no images"):
        ImageProcessor()([])
