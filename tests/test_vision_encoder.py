"""MobileNet-V5 vision tower parity with timm / transformers (float32, CPU).

Errors are max |mlx - ref| / max |ref| over the whole output. Measured (x86_64, MLX CPU):
  timm, random weights, [2,3,256,256]: 3.1e-6   [1,3,200,328]: 2.9e-6
  HF tiny checkpoint, 768x768 image through ImageProcessor: 1.4e-6 (tower), 1.5e-6 (after embed_vision)
"""

import glob
import math
import time

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from reference import randomize_

from mlx_gemma3n.tiny import TINY_CONFIG
from mlx_gemma3n.vision import ImageProcessor, VisionConfig, VisionTower
from mlx_gemma3n.vision.blocks import make_divisible
from mlx_gemma3n.vision.encoder import _conv_layout

torch.set_num_threads(1)

TOL = 1e-4


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def tokens(nchw: torch.Tensor) -> np.ndarray:
    """transformers' get_image_features reshape: [B, C, H, W] -> [B, H*W, C]."""
    b, c = nchw.shape[:2]
    return nchw.reshape(b, c, -1).permute(0, 2, 1).numpy()


@pytest.fixture(scope="module")
def timm_tiny():
    """timm's encoder built the way transformers' TimmWrapperModel builds it, with every parameter
    randomised (layer-scale gammas would otherwise be 1e-5 and hide most of each block)."""
    import timm

    cfg = TINY_CONFIG["vision_config"]
    model = timm.create_model(
        cfg["architecture"], pretrained=False, num_classes=0, **cfg["model_args"]
    ).eval()
    randomize_(model, seed=0)
    return model


@pytest.fixture(scope="module")
def mlx_tiny(timm_tiny):
    tower = VisionTower(VisionConfig.from_dict(TINY_CONFIG["vision_config"]))
    weights = {
        f"timm_model.{k}": mx.array(v.detach().numpy()) for k, v in timm_tiny.state_dict().items()
    }
    tower.load_weights(list(VisionTower.sanitize(weights).items()), strict=True)
    return tower


def test_channel_multiplier_matches_timm(timm_tiny, mlx_tiny):
    ours = {k: v.shape for k, v in tree_flatten(mlx_tiny.parameters())}
    theirs = {f"timm_model.{k}": tuple(v.shape) for k, v in timm_tiny.state_dict().items()}
    assert set(ours) == set(theirs)
    for k, s in theirs.items():
        expect = (s[0], s[2], s[3], s[1]) if len(s) == 4 else s
        assert tuple(ours[k]) == expect, k
    # The stem stays at 64 channels (fix_stem when channel_multiplier < 1); stages are scaled.
    assert ours["timm_model.conv_stem.conv.weight"][0] == 64
    assert ours["timm_model.blocks.3.0.pw_proj.conv.weight"][0] == make_divisible(1280 * 0.125)


@pytest.mark.parametrize("shape", [(2, 3, 256, 256), (1, 3, 200, 328)])
def test_matches_timm_random_weights(timm_tiny, mlx_tiny, shape):
    # 256x256: MSFA map is already 16x16. 200x328: odd feature sizes exercise TF 'same' padding on
    # every stride-2 conv, nearest upsampling 7x11 -> 13x21 and the bilinear resize to 16x16.
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    with torch.no_grad():
        ref = tokens(timm_tiny(torch.from_numpy(x)))
    out = mlx_tiny(mx.array(x))
    assert out.shape == (shape[0], 256, 2048)
    assert rel_err(out, ref) < TOL  # measured 3.1e-6 / 2.9e-6


def test_sanitize_is_idempotent(mlx_tiny):
    current = dict(tree_flatten(mlx_tiny.parameters()))
    again = VisionTower.sanitize(current)
    assert set(again) == set(current)
    assert all(mx.array_equal(again[k], current[k]).item() for k in current)
    # the stem's [64, 3, 3, 3] cannot tell its layout; it follows the other convs in the dict
    assert _conv_layout(current["timm_model.conv_stem.conv.weight"].shape) is None
    stem = {
        "model.vision_tower.timm_model.conv_stem.conv.weight": mx.arange(64 * 27.0).reshape(64, 3, 3, 3)
    }
    assert mx.array_equal(
        VisionTower.sanitize(stem)["timm_model.conv_stem.conv.weight"],
        stem["model.vision_tower.timm_model.conv_stem.conv.weight"].transpose(0, 2, 3, 1),
    )


def test_rejects_nhwc_and_unknown_model_args(mlx_tiny):
    with pytest.raises(ValueError, match="NCHW"):
        mlx_tiny(mx.zeros((1, 32, 32, 3)))
    cfg = dict(
        TINY_CONFIG["vision_config"], model_args={"channel_multiplier": 0.125, "depth_multiplier": 2}
    )
    with pytest.raises(NotImplementedError, match="depth_multiplier"):
        VisionTower(VisionConfig.from_dict(cfg))


def test_hf_tiny_checkpoint(tiny_hf, tmp_path):
    """Weights loaded by name from the sharded HF checkpoint reproduce transformers' vision tower
    on a real preprocessed 768x768 image (the MSFA avg-pool path), and scaling by sqrt(hidden)
    then transformers' embed_vision reproduces get_image_features' pooler_output."""
    from PIL import Image
    from safetensors.numpy import load_file
    from transformers import SiglipImageProcessor

    path, hf = tiny_hf
    prefix = "model.vision_tower."
    weights = {}
    for f in sorted(glob.glob(str(path / "*.safetensors"))):
        weights.update(
            {k[len(prefix) :]: mx.array(v) for k, v in load_file(f).items() if k.startswith(prefix)}
        )
    assert weights and all(k.startswith("timm_model.") for k in weights)
    config = VisionConfig.from_dict(hf.config.vision_config.to_dict())
    assert config.model_args == {"channel_multiplier": 0.125}
    tower = VisionTower(config)
    tower.load_weights(list(VisionTower.sanitize(weights).items()), strict=True)

    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:600, 0:900]
    img = np.stack([(xx * 255 // 899), (yy * 255 // 599), ((xx + yy) % 256)], -1) + rng.integers(
        0, 40, (600, 900, 3)
    )
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    pixels = ImageProcessor()(img)
    hf_pixels = SiglipImageProcessor(size={"height": 768, "width": 768}, resample=2, do_normalize=False)(
        img, return_tensors="pt"
    )["pixel_values"]
    np.testing.assert_array_equal(pixels, hf_pixels.numpy())

    out = tower(mx.array(pixels))
    with torch.no_grad():
        ref = hf.model.vision_tower(pixel_values=hf_pixels, do_pooling=False).last_hidden_state
        feats = hf.model.get_image_features(hf_pixels)
        embedded = hf.model.embed_vision(
            inputs_embeds=torch.from_numpy(np.array(out)) * config.hidden_size**0.5
        )
    assert out.shape == (1, 256, 2048)
    assert rel_err(out, tokens(ref)) < TOL
    # get_image_features scales its reshaped view in place, so its last_hidden_state is
    # already multiplied by sqrt(hidden_size); ours is not.
    assert rel_err(np.array(out) * math.sqrt(2048), tokens(feats.last_hidden_state)) < TOL
    assert rel_err(embedded.numpy(), feats.pooler_output.numpy()) < TOL


def test_full_300m_shapes_random_weights():
    """The real mobilenetv5_300m_enc (no channel multiplier), one 768x768 forward, MLX only.
    ~294M parameters; the forward took 23-32 s on 2 (shared) x86 cores."""
    tower = VisionTower(VisionConfig())
    params = tree_flatten(tower.parameters())
    assert sum(v.size for _, v in params) == 294_126_912
    # Random weights, cheaply: slices of one shared normal buffer at per-tensor offsets.
    mx.random.seed(0)
    pool = mx.random.normal((max(v.size for _, v in params) + 10_007 * len(params),))
    new = []
    for i, (k, v) in enumerate(params):
        noise = pool[10_007 * i : 10_007 * i + v.size].reshape(v.shape)
        new.append((k, noise * math.prod(v.shape[1:]) ** -0.5 if v.ndim > 1 else v + 0.2 * noise))
    tower.load_weights(new)
    mx.eval(tower.parameters())
    x = mx.random.uniform(shape=(1, 3, 768, 768))
    t0 = time.time()
    out = tower(x)
    mx.eval(out)
    print(f"300M vision tower forward: {time.time() - t0:.1f}s")
    assert out.shape == (1, 256, 2048)
    assert out.dtype == mx.float32
    assert bool(mx.all(mx.isfinite(out)).item())
    assert float(mx.std(out).item()) > 0.1
