"""The executor's kernel source is MLX's: pinned to what `mx.fast.metal_kernel(..., verbose=True)`
prints inside `mx.export_function` (where a metal_kernel call does not need Metal)."""

import re

import mlx.core as mx
import pytest

from metal_executor import source

CASES = {
    "templated": dict(
        input_names=["inp", "alpha"], output_names=["out", "out2"], header="",
        source="uint e = thread_position_in_grid.x; uint l = thread_index_in_simdgroup;\n"
               "T t = inp[e]; out[e] = metal::exp(t) * alpha[0] + N;",
        inputs=[mx.zeros((4, 5), mx.float16), mx.zeros((1,))],
        output_shapes=[(4, 5), (2,)], output_dtypes=[mx.float32, mx.bfloat16],
        template=[("T", mx.float32), ("N", 3), ("B", True)]),
    "shapes_scalars_header": dict(
        input_names=["a", "b", "c", "d"], output_names=["o1", "o2"], header="#define FOO 1\n",
        source="uint3 p = threads_per_threadgroup; a_shape[0]; a_strides[0]; a_ndim; b_shape;\n"
               "simdgroup_index_in_threadgroup; threadgroup_position_in_grid; grid_size;",
        inputs=[mx.zeros((3, 4), mx.bfloat16), mx.zeros((2,), mx.int32), mx.array(1, mx.uint32),
                mx.zeros((9,), mx.bool_)],
        output_shapes=[(3,), (4,)], output_dtypes=[mx.float16, mx.int64],
        template=[("U", mx.int8), ("Z", False)]),
    "every_attribute": dict(
        input_names=["x"], output_names=["y"], header="",
        source=" ".join(a for a, _ in source.METAL_ATTRIBUTES),
        inputs=[mx.zeros((8,), mx.uint8)], output_shapes=[(8,)], output_dtypes=[mx.uint16],
        template=None),
    # MLX closes the parameter list early here (its index counts the shape buffer).
    "atomic_two_outputs_with_shape": dict(
        input_names=["a"], output_names=["o1", "o2"], header="", source="a_shape[0];",
        inputs=[mx.zeros((3, 4), mx.int16)], output_shapes=[(3,), (4,)],
        output_dtypes=[mx.float32, mx.int32], template=None, atomic_outputs=True),
}


def mlx_generated(capfd, tmp_path, case):
    kern = mx.fast.metal_kernel(name="pin", input_names=case["input_names"],
                                output_names=case["output_names"], source=case["source"],
                                header=case["header"],
                                atomic_outputs=case.get("atomic_outputs", False))

    def traced(*xs):
        return kern(inputs=list(xs), template=case["template"], grid=(32, 1, 1),
                    threadgroup=(32, 1, 1), output_shapes=case["output_shapes"],
                    output_dtypes=case["output_dtypes"], verbose=True)

    capfd.readouterr()
    mx.export_function(str(tmp_path / "pin.mlxfn"), traced, *case["inputs"])
    printed = capfd.readouterr().out
    found = re.search(r"Generated source code for `pin`:\n```\n(.*)\n```\n", printed, re.S)
    assert found, printed
    return found.group(1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_generated_source_is_mlx_s(capfd, tmp_path, case):
    c = CASES[case]
    ours = source.generate("pin", c["input_names"], c["output_names"], c["source"], c["header"],
                           c["inputs"], c["output_dtypes"], c["template"],
                           c.get("atomic_outputs", False))
    assert ours.source == mlx_generated(capfd, tmp_path, c)
