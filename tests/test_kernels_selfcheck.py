"""The once-per-kernel self-check, driven through the CPU executor: a kernel that does not
compile, computes the wrong thing or writes out of bounds is disabled with one warning and
the reference path takes over; a good one passes its check and then runs."""

import warnings

import mlx.core as mx
import numpy as np
import pytest
from kernel_launches import Counting
from metal_executor import metal_kernel

from mlx_gemma3n.kernels import FusedOp, use_factory
from mlx_gemma3n.kernels import ple_residual as module

GOOD = module.ple_residual


def _variant(source: str) -> FusedOp:
    return FusedOp(
        "ple_residual_variant",
        GOOD.spec["input_names"],
        GOOD.spec["output_names"],
        source,
        GOOD.launch,
        GOOD.reference,
        GOOD.sample,
        header=GOOD.spec["header"],
    )


@pytest.mark.parametrize(
    "edit, reason",
    [
        (("sq[0] / D", "sq[0] / (D + 1)"), "ValueError: output differs from the reference"),
        (("metal::rsqrt(", "metal::rsqrtt("), "CompileError"),
        (("j < N; ++j", "j <= N; ++j"), "ExecutorError: .*canary"),
    ],
    ids=["wrong-math", "compile-error", "write-past-the-end"],
)
def test_broken_kernel_is_disabled_with_one_warning(edit, reason):
    assert edit[0] in GOOD.spec["source"]
    op = _variant(GOOD.spec["source"].replace(*edit))
    args = module.sample(mx.float32, rows=2, d=64)
    want = GOOD.reference(*args)[0]
    with use_factory(metal_kernel):
        with pytest.warns(RuntimeWarning, match=f"'ple_residual_variant'.*{reason}"):
            got = op(*args)[0]
        assert np.array_equal(np.array(got), np.array(want))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert np.array_equal(np.array(op(*args)[0]), np.array(want))


def test_good_kernel_checks_itself_once_then_runs():
    factory = Counting()
    op = _variant(GOOD.spec["source"])
    args = module.sample(mx.float32, rows=2, d=64)
    with use_factory(factory), warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            got = op(*args)[0]
    assert len(factory.launches) == 1 + 2
    assert np.allclose(np.array(got), np.array(GOOD.reference(*args)[0]), rtol=1e-5, atol=1e-6)
