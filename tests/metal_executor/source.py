"""The kernel source MLX generates for `mx.fast.metal_kernel`, reproduced character for character.

MLX (mlx/backend/metal/custom_kernel.cpp) builds a signature from the inputs' dtypes and sizes,
the output names/dtypes, the template arguments and the thread attributes the body mentions,
then appends an explicit instantiation; `tests/test_metal_executor.py` pins this module to the
source MLX itself prints with `verbose=True`.
"""

import re
from dataclasses import dataclass

import mlx.core as mx

# Inputs with fewer elements than this are passed in the constant address space.
MAX_CONSTANT_ARRAY_SIZE = 8

TYPE_STRINGS = {
    mx.bool_: "bool", mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t",
    mx.uint64: "uint64_t", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t",
    mx.int64: "int64_t", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t",
    mx.float32: "float", mx.float64: "double", mx.complex64: "complex64_t",
}

# (attribute, type) in the order MLX lists them; a body that mentions the name gets the parameter.
METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)


def type_string(dtype):
    """MLX's Metal type name for a dtype (`get_type_string`)."""
    if dtype not in TYPE_STRINGS:
        raise TypeError(f"metal_kernel: unsupported dtype {dtype}")
    return TYPE_STRINGS[dtype]


@dataclass(frozen=True)
class Param:
    """One kernel parameter: its C declaration and how the launcher passes it."""

    decl: str        # e.g. "const device float* inp"
    kind: str        # "input", "shape", "strides", "ndim", "output"
    index: int       # input/output position it belongs to
    by_ref: bool = False


@dataclass(frozen=True)
class Generated:
    """MLX's kernel name and full source, plus the parameter list the launcher fills."""

    name: str
    source: str
    params: tuple
    attributes: tuple
    template_def: str   # e.g. "<float, 3, 1>" or ""


def shape_infos(source, input_names):
    """Per input: whether the body uses `<name>_shape`, `<name>_strides`, `<name>_ndim`."""
    return [tuple(f"{n}_{k}" in source for k in ("shape", "strides", "ndim")) for n in input_names]


def used_attributes(source):
    return tuple((a, t) for a, t in METAL_ATTRIBUTES if a in source)


def _template_value(arg):
    if isinstance(arg, bool):
        return "1" if arg else "0"
    if isinstance(arg, int):
        return str(arg)
    return type_string(arg)


def _template_kind(arg):
    return "bool" if isinstance(arg, bool) else "int" if isinstance(arg, int) else "typename"


def kernel_name(name, template, inputs, output_dtypes):
    """`custom_kernel_<name>[_<template hash>]` + one suffix per input and output dtype."""
    out = "custom_kernel_" + name
    if template:
        tdef = "<" + ", ".join(_template_value(v) for _, v in template) + ">"
        out += "_" + re.sub(r"<|>|(, )", "_", tdef)[:-1]
    for x in inputs:
        out += "_" + type_string(x.dtype)
        out += "s" if x.ndim == 0 else "c" if x.size < MAX_CONSTANT_ARRAY_SIZE else ""
    for d in output_dtypes:
        out += "_" + type_string(d)
    return out


def _signature_params(input_names, inputs, output_names, output_dtypes, infos, atomic):
    params = []
    for i, (n, x) in enumerate(zip(input_names, inputs)):
        space = "constant" if x.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if x.ndim == 0 else "*"
        params.append(Param(f"const {space} {type_string(x.dtype)}{ref} {n}", "input", i, x.ndim == 0))
        if x.ndim > 0:
            shape, strides, ndim = infos[i]
            if shape:
                params.append(Param(f"const constant int* {n}_shape", "shape", i))
            if strides:
                params.append(Param(f"const constant int64_t* {n}_strides", "strides", i))
            if ndim:
                params.append(Param(f"const constant int& {n}_ndim", "ndim", i, True))
    for i, (n, d) in enumerate(zip(output_names, output_dtypes)):
        t = f"atomic<{type_string(d)}>" if atomic else type_string(d)
        params.append(Param(f"device {t}* {n}", "output", i))
    return params


def generate(name, input_names, output_names, source, header, inputs, output_dtypes,
             template=(), atomic_outputs=False):
    """What `metal_kernel(...)(...)` compiles (less MLX's utils() prelude) for these arguments."""
    template = list(template or ())
    infos = shape_infos(source, input_names)
    attrs = used_attributes(source)
    kname = kernel_name(name, template, inputs, output_dtypes)
    params = _signature_params(input_names, inputs, output_names, output_dtypes, infos,
                               atomic_outputs)
    text = header
    if template:
        text += "template <" + ", ".join(f"{_template_kind(v)} {k}" for k, v in template) + ">\n"
    text += f"[[kernel]] void {kname}(\n"
    last_input = len(params) - len(output_names) - 1
    for i, p in enumerate(params):
        text += f"  {p.decl} [[buffer({i})]]"
        if i <= last_input:
            text += ",\n"
        # MLX's test (it counts shape/stride buffers in the index, so with those and several
        # outputs and no attributes MLX itself closes the list early).
        elif i < len(inputs) + len(output_names) - 1 or attrs:
            text += ",\n"
        else:
            text += ") {\n"
    text += ",\n".join(f"  {t} {a} [[{a}]]" for a, t in attrs) + (") {\n" if attrs else "")
    text += source + "\n}\n"
    tdef = ""
    if template:
        tdef = "<" + ", ".join(_template_value(v) for _, v in template) + ">"
        full = kname + tdef
        text += (f'\ntemplate [[host_name("{kname}")]] [[kernel]] decltype({full}) {full};\n')
    return Generated(kname, text, tuple(params), attrs, tdef)
