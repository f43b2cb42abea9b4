"""Gemma 3n's vision tower: timm's `mobilenetv5_300m_enc` (MobileNet-V5 encoder) in MLX.

`VisionTower(config)(pixel_values)` maps NCHW pixel values (what `ImageProcessor` returns) to the
[B, 256, 2048] soft-token sequence, i.e. the NHWC [B, 16, 16, 2048] MSFA output flattened in row-major
(h, w) order -- the same tensor transformers' `get_image_features` builds by reshaping/permuting the
NCHW map. The sqrt(hidden_size) scaling that transformers applies before `embed_vision` is NOT
included: the caller multiplies by `config.hidden_size ** 0.5`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from .blocks import ConvNormAct, EdgeResidual, MobileAttention, UniversalInvertedResidual, make_divisible
from .config import VisionConfig
from .msfa import MultiScaleFusionAdapter

# Block strings as in timm's `_gen_mobilenet_v5` (non-"base" variant):
# type_r{repeat}_a{dw start k}_k{dw mid k}_s{stride}_e{exp}_h{heads}_v{kv stride}_d{head dim}_c{chs}
_MNV5_300M_ARCH = [
    ["er_r1_k3_s2_e4_c128", "er_r1_k3_s1_e4_c128", "er_r1_k3_s1_e4_c128"],
    [
        "uir_r1_a3_k5_s2_e6_c256",
        "uir_r1_a5_k0_s1_e4_c256",
        "uir_r1_a3_k0_s1_e4_c256",
        "uir_r1_a5_k0_s1_e4_c256",
        "uir_r1_a3_k0_s1_e4_c256",
    ],
    ["uir_r1_a5_k5_s2_e6_c640"]
    + ["uir_r1_a5_k0_s1_e4_c640"] * 7
    + ["uir_r1_a0_k0_s1_e1_c640"]
    + ["mqa_r1_k3_h12_v2_s1_d64_c640", "uir_r1_a0_k0_s1_e2_c640"] * 14,
    ["uir_r1_a5_k5_s2_e6_c1280"] + ["mqa_r1_k3_h16_s1_d96_c1280", "uir_r1_a0_k0_s1_e2_c1280"] * 19,
]

ARCHITECTURES = {"mobilenetv5_300m_enc": _MNV5_300M_ARCH}

# timm.create_model kwargs that change the architecture and are implemented here.
SUPPORTED_MODEL_ARGS = {
    "channel_multiplier",
    "pad_type",
    "stem_size",
    "fix_stem",
    "msfa_indices",
    "msfa_output_resolution",
    "layer_scale_init_value",
    "in_chans",
    "stem_bias",
}
# kwargs that only matter for training / classification heads (the encoder has none).
IGNORED_MODEL_ARGS = {
    "num_classes",
    "global_pool",
    "drop_rate",
    "drop_path_rate",
    "pretrained",
    "features_only",
    "head_bias",
    "head_norm",
    "head_conv",
    "num_features",
    "out_indices",
}


@dataclass
class BlockSpec:
    block_type: str
    out_chs: int
    stride: int
    kernel: int = 0  # er: expansion conv; uir: mid depthwise; mqa: kv down-conv
    start_kernel: int = 0
    end_kernel: int = 0
    exp_ratio: float = 1.0
    num_heads: int = 0
    kv_dim: int = 0
    kv_stride: int = 1
    noskip: bool = False


def decode_block(s: str) -> tuple[BlockSpec, int]:
    block_type, *ops = s.split("_")
    opts, noskip = {}, False
    for op in ops:
        if op == "noskip":
            noskip = True
            continue
        m = re.match(r"([a-z]+)(\d.*)", op)
        if m is None:
            raise ValueError(f"cannot parse {op!r} in block string {s!r}")
        opts[m.group(1)] = m.group(2)
    spec = BlockSpec(
        block_type,
        int(opts["c"]),
        int(opts["s"]),
        kernel=int(opts.get("k", 0)),
        start_kernel=int(opts.get("a", 0)),
        end_kernel=int(opts.get("p", 0)),
        exp_ratio=float(opts.get("e", 1.0)),
        num_heads=int(opts.get("h", 0)),
        kv_dim=int(opts.get("d", 0)),
        kv_stride=int(opts.get("v", 1)),
        noskip=noskip,
    )
    if block_type not in ("er", "uir", "mqa"):
        raise ValueError(f"unsupported block type {block_type!r}")
    return spec, int(opts.get("r", 1))


def round_channels(chs: int, multiplier: float = 1.0) -> int:
    return make_divisible(chs * multiplier) if multiplier else chs


class MobileNetV5Encoder(nn.Module):
    def __init__(
        self,
        arch: list[list[str]],
        channel_multiplier: float = 1.0,
        stem_size: int = 64,
        fix_stem: bool | None = None,
        stem_bias: bool = True,
        in_chans: int = 3,
        pad_type: str = "same",
        msfa_indices=(-2, -1),
        msfa_output_resolution: int = 16,
        num_features: int = 2048,
        layer_scale_init_value: float | None = 1e-5,
    ):
        super().__init__()
        round_chs = partial(round_channels, multiplier=channel_multiplier)
        if fix_stem is None:  # timm: the stem is not scaled when channels are shrunk
            fix_stem = channel_multiplier < 1.0
        if not fix_stem:
            stem_size = round_chs(stem_size)
        self.conv_stem = ConvNormAct(in_chans, stem_size, 3, stride=2, bias=stem_bias, padding=pad_type)

        in_chs, stride = stem_size, 2
        feature_chs = []
        stages = [[decode_block(s) for s in stage] for stage in arch]
        if stages[0][0][0].stride > 1:
            feature_chs.append(stem_size)
        self.blocks = []
        for si, stage in enumerate(stages):
            blocks = []
            specs = [spec for spec, repeat in stage for _ in range(repeat)]
            for bi, spec in enumerate(specs):
                s = spec.stride if bi == 0 else 1
                stride *= s
                if stride > 32:
                    raise NotImplementedError("output stride > 32 (dilation) is not supported")
                out_chs = round_chs(spec.out_chs)
                common = dict(noskip=spec.noskip, padding=pad_type)
                if spec.block_type == "er":
                    block = EdgeResidual(in_chs, out_chs, spec.kernel, s, spec.exp_ratio, **common)
                elif spec.block_type == "uir":
                    block = UniversalInvertedResidual(
                        in_chs,
                        out_chs,
                        spec.start_kernel,
                        spec.kernel,
                        spec.end_kernel,
                        s,
                        spec.exp_ratio,
                        layer_scale_init_value=layer_scale_init_value,
                        **common,
                    )
                else:
                    block = MobileAttention(
                        in_chs,
                        out_chs,
                        spec.num_heads,
                        spec.kv_dim,
                        spec.kv_dim,
                        stride=s,
                        kv_stride=spec.kv_stride,
                        dw_kernel_size=spec.kernel,
                        layer_scale_init_value=layer_scale_init_value,
                        **common,
                    )
                blocks.append(block)
                in_chs = out_chs
            self.blocks.append(blocks)
            if si + 1 == len(stages) or stages[si + 1][0][0].stride > 1:
                feature_chs.append(in_chs)

        n = len(feature_chs)
        self._msfa_indices = sorted(i % n for i in msfa_indices)
        self.msfa = MultiScaleFusionAdapter(
            sum(feature_chs[i] for i in self._msfa_indices),
            num_features,
            msfa_output_resolution,
            padding=pad_type,
        )

    def __call__(self, x: mx.array) -> mx.array:
        """x: [B, H, W, C] -> [B, R, R, num_features] (R = msfa_output_resolution)."""
        taps = []
        x = self.conv_stem(x)
        if 0 in self._msfa_indices:
            taps.append(x)
        for i, stage in enumerate(self.blocks, start=1):
            for block in stage:
                x = block(x)
            if i in self._msfa_indices:
                taps.append(x)
        return self.msfa(taps)


def _conv_layout(shape) -> str | None:
    """'torch' for [O, I, k, k], 'mlx' for [O, k, k, I], None when the shape cannot tell."""
    _, b, c, d = shape
    if c == d and b != c:
        return "torch"
    if b == c and c != d:
        return "mlx"
    return None


class VisionTower(nn.Module):
    """Parameters live under `timm_model.` exactly like `model.vision_tower.` in HF checkpoints."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        if config.architecture not in ARCHITECTURES:
            raise NotImplementedError(f"vision architecture {config.architecture!r} is not supported")
        args = dict(config.model_args or {})
        unknown = set(args) - SUPPORTED_MODEL_ARGS - IGNORED_MODEL_ARGS
        if unknown:
            raise NotImplementedError(f"unsupported vision model_args: {sorted(unknown)}")
        if args.get("features_only"):
            raise NotImplementedError("features_only vision towers are not supported")
        args = {k: v for k, v in args.items() if k in SUPPORTED_MODEL_ARGS}
        self.timm_model = MobileNetV5Encoder(ARCHITECTURES[config.architecture], **args)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        """pixel_values: [B, 3, H, W] (NCHW, as from `ImageProcessor`) -> [B, R*R, 2048], unscaled."""
        if (
            pixel_values.ndim != 4
            or pixel_values.shape[1] != self.timm_model.conv_stem.conv.weight.shape[-1]
        ):
            raise ValueError(
                f"expected NCHW pixel values [B, 3, H, W], got shape {tuple(pixel_values.shape)}"
            )
        x = pixel_values.transpose(0, 2, 3, 1).astype(self.timm_model.conv_stem.conv.weight.dtype)
        x = self.timm_model(x)
        B, H, W, C = x.shape
        return x.reshape(B, H * W, C)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """HF/timm names and layouts -> this module's.

        Accepts keys with or without a `model.vision_tower.` / `vision_tower.` prefix and drops keys
        outside `timm_model.`. 4-D conv weights go from [O, I, kh, kw] to [O, kh, kw, I]; tensors already
        in MLX layout pass unchanged (detected by shape). A shape that cannot tell (e.g. the stem's
        [64, 3, 3, 3]) follows the layout the other conv weights in the dict show, and torch layout
        if there are none.
        """
        out = {}
        for k, v in weights.items():
            for prefix in ("model.vision_tower.", "vision_tower."):
                if k.startswith(prefix):
                    k = k[len(prefix) :]
                    break
            if k.startswith("timm_model."):
                out[k] = v
        votes = [_conv_layout(v.shape) for v in out.values() if v.ndim == 4]
        default = "mlx" if votes.count("mlx") > votes.count("torch") else "torch"
        for k, v in out.items():
            if v.ndim == 4 and (_conv_layout(v.shape) or default) == "torch":
                out[k] = v.transpose(0, 2, 3, 1)
        return out
