"""Kernels (a) and (b) executed by the CPU executor: AltUp predict and correct, the AltUp
stream entry and exit, the attention and per-layer-input residual chains and the
per-layer-input gate. Every dtype, ragged widths (not multiples of 32, wider than one pass
of a threadgroup), one and several rows, every lane schedule; tolerances in kernel_check.py."""

import pytest
from kernel_check import DTYPES, check_kernel

from mlx_gemma3n.kernels.altup_correct import altup_correct
from mlx_gemma3n.kernels.altup_predict import altup_predict
from mlx_gemma3n.kernels.altup_streams import altup_embed, altup_unembed
from mlx_gemma3n.kernels.attn_residual import attn_residual
from mlx_gemma3n.kernels.ple_residual import ple_residual

# (rows, width): below one simdgroup pair, ragged over 7 simdgroups, two passes of 512 threads
SHAPES = [(1, 40), (3, 200), (2, 1100)]


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "first-layer"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, d", SHAPES)
def test_altup_predict(dtype, rows, d, residual):
    """With the previous layer's per-layer residual applied as the streams are read, and
    without (the first layer)."""
    args = altup_predict.sample(dtype, rows=rows, d=d, clip=0.5, residual=residual)
    check_kernel(altup_predict, args)


@pytest.mark.parametrize("active, clip", [(1, None), (2, 0.3)])
def test_altup_predict_active_stream_and_clip(active, clip):
    check_kernel(altup_predict, altup_predict.sample(DTYPES[0], active=active, clip=clip))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, d", SHAPES)
def test_altup_correct(dtype, rows, d):
    check_kernel(altup_correct, altup_correct.sample(dtype, rows=rows, d=d))


@pytest.mark.parametrize("active, clip, scaled", [(1, None, False), (3, 0.3, True)])
def test_altup_correct_active_stream_clip_and_scale(active, clip, scaled):
    args = altup_correct.sample(DTYPES[0], active=active, clip=clip, scaled=scaled)
    check_kernel(altup_correct, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, d", SHAPES)
def test_attn_residual(dtype, rows, d):
    check_kernel(attn_residual, attn_residual.sample(dtype, rows=rows, d=d, active=rows - 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, d", SHAPES)
def test_ple_residual(dtype, rows, d):
    check_kernel(ple_residual, ple_residual.sample(dtype, rows=rows, d=d))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, d", SHAPES)
def test_altup_embed(dtype, rows, d):
    check_kernel(altup_embed, altup_embed.sample(dtype, rows=rows, d=d))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, d", SHAPES)
def test_altup_unembed(dtype, rows, d):
    check_kernel(altup_unembed, altup_unembed.sample(dtype, rows=rows, d=d))
