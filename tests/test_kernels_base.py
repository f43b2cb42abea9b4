"""The kernel framework: dispatch, the reference switch and the once-per-kernel self-check,
with stand-in factories (the executor-backed tests are in test_kernels_*.py)."""

import contextlib
import warnings

import mlx.core as mx
import pytest

from mlx_gemma3n.kernels import ENV_SWITCH, FusedOp, kernels_enabled, use_factory

DOUBLE = """
uint i = thread_position_in_grid.x;
out[i] = static_cast<T>(2.0f * static_cast<float>(x[i]));
"""


def _launch(kernel, x):
    return tuple(
        kernel(
            inputs=[x],
            template=[("T", x.dtype)],
            grid=(x.size, 1, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[x.shape],
            output_dtypes=[x.dtype],
        )
    )


def _op(name="double"):
    return FusedOp(
        name=name,
        input_names=["x"],
        output_names=["out"],
        source=DOUBLE,
        launch=_launch,
        reference=lambda x: (x * 2,),
        sample=lambda dtype: (mx.arange(64).astype(dtype),),
    )


class Factory:
    """Builds MLX-computed stand-in kernels; counts builds and launches."""

    def __init__(self, factor=2.0, fail_build=False):
        self.factor, self.fail_build = factor, fail_build
        self.builds = self.launches = 0

    def __call__(self, name, input_names, output_names, source, header="", **options):
        self.builds += 1
        if self.fail_build:
            raise RuntimeError("program_source:3:1: error: use of undeclared identifier")

        def kernel(inputs, output_dtypes, **launch):
            self.launches += 1
            return [(inputs[0] * self.factor).astype(output_dtypes[0])]

        return kernel


def test_cpu_default_is_the_reference():
    assert not kernels_enabled()
    assert _op()(mx.array([1.0, 2.0]))[0].tolist() == [2.0, 4.0]


def test_factory_is_used_after_one_self_check():
    factory, op = Factory(), _op()
    with use_factory(factory), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels_enabled()
        for _ in range(3):
            assert op(mx.array([1.5]))[0].item() == 3.0
    assert factory.builds == 1 and factory.launches == 1 + 3  # self-check + three calls


def test_switch_forces_the_reference(monkeypatch):
    factory, op = Factory(), _op()
    with use_factory(factory):
        assert op(mx.array([1.0]), enabled=False)[0].item() == 2.0
        monkeypatch.setenv(ENV_SWITCH, "0")
        assert not kernels_enabled()
        assert op(mx.array([1.0]))[0].item() == 2.0
    assert factory.builds == 0 and factory.launches == 0


@pytest.mark.parametrize(
    "factory, reason",
    [(Factory(factor=3.0), "differs from the reference"), (Factory(fail_build=True), "error")],
)
def test_broken_kernel_warns_once_and_falls_back(factory, reason):
    op = _op("broken")
    with use_factory(factory):
        with pytest.warns(RuntimeWarning, match=f"'broken'.*{reason}.*reference path"):
            assert op(mx.array([1.0, 5.0]))[0].tolist() == [2.0, 10.0]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert op(mx.array([4.0]))[0].item() == 8.0
    assert factory.builds == 1


def test_each_dtype_checks_itself():
    factory, op = Factory(), _op()
    with use_factory(factory):
        for dtype in (mx.float32, mx.float16, mx.bfloat16):
            assert op(mx.array([1.0], dtype=dtype))[0].dtype == dtype
    assert factory.builds == 3


def test_leaving_the_factory_drops_compiled_kernels():
    factory, op = Factory(), _op()
    with use_factory(factory):
        op(mx.array([1.0]))
    assert op(mx.array([1.0]))[0].item() == 2.0 and factory.launches == 2


def test_self_check_reference_runs_on_the_cpu(monkeypatch):
    """A GPU rounds float32 matmuls like TF32 by default; the check's reference must not."""
    real_stream, inside = mx.stream, []

    @contextlib.contextmanager
    def spy(where):
        inside.append(where)
        with real_stream(where):
            yield
        inside.pop()

    seen = {}

    def reference(x):
        seen["reference"] = list(inside)
        return (x * 2,)

    def launch(kernel, x):
        seen["kernel"] = list(inside)
        return _launch(kernel, x)

    op = FusedOp("double", ["x"], ["out"], DOUBLE, launch, reference, lambda dtype: (mx.arange(8).astype(dtype),))
    monkeypatch.setattr(mx, "stream", spy)
    with use_factory(Factory()):
        op(mx.array([1.0]))
    assert seen == {"reference": [mx.cpu], "kernel": []}
