"""Bias-free linear layers that read the same input, computed as one matvec.

At decode each matvec is a launch, so q/k/v and gate/up are joined when a checkpoint is
loaded (any layout): the layers' weights, and their quantization scales and biases, are
concatenated along the output rows, and the result is split back into each layer's output
(views). Affine and microscaled groups run along the input dims, so quantized layers join as
stored. The joined tensors are built lazily from the lazily read ones, so when they are first
evaluated the parts are read, copied once and dropped: the weights are never resident twice.
"""

import copy
from itertools import accumulate
from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..quantized import QuantizedLinear


def _kind(layer: nn.Module) -> Optional[tuple]:
    """What must agree for layers to join: their class and quantization, the input width and
    the dtype of every parameter; None for a layer that cannot join (a bias, another class)."""
    if type(layer) not in (nn.Linear, nn.QuantizedLinear, QuantizedLinear) or "bias" in layer:
        return None
    params = layer.parameters()
    quantization = tuple(getattr(layer, k, None) for k in ("group_size", "bits", "mode"))
    return (type(layer), quantization,
            tuple((k, v.shape[1:], v.dtype) for k, v in sorted(params.items())))


class ConcatLinear(nn.Module):
    """Several bias-free linear layers on one input as one layer; returns their outputs."""

    def __init__(self, linear: nn.Module, sizes: List[int]):
        super().__init__()
        self.linear = linear
        self._offsets = list(accumulate(sizes))[:-1]

    @classmethod
    def join(cls, *layers: nn.Module) -> Optional["ConcatLinear"]:
        """The layers (nn.Linear or nn.QuantizedLinear) joined, or None when they differ in
        kind, quantization, input width or dtype, or have a bias."""
        kinds = {_kind(layer) for layer in layers}
        if len(kinds) != 1 or None in kinds:
            return None
        linear = copy.copy(layers[0])
        for key in layers[0].parameters():
            setattr(linear, key, mx.concatenate([layer[key] for layer in layers]))
        return cls(linear, [layer["weight"].shape[0] for layer in layers])

    def __call__(self, x: mx.array) -> List[mx.array]:
        return mx.split(self.linear(x), self._offsets, axis=-1)


def join_layers(module: nn.Module, joined: str, parts: Sequence[str]) -> None:
    """Replace `module`'s linear layers named `parts` by one ConcatLinear named `joined`,
    where they can join (else leave them)."""
    layer = ConcatLinear.join(*(module[name] for name in parts))
    if layer is not None:
        setattr(module, joined, layer)
        for name in parts:
            delattr(module, name)


def layer_outputs(module: nn.Module, joined: str, parts: Sequence[str], x: mx.array) -> list:
    """The outputs of `module`'s layers `parts` on `x`, through their join where there is one."""
    if joined in module:
        return module[joined](x)
    return [module[name](x) for name in parts]


def fuse_projections(model: nn.Module) -> None:
    """Join q/k/v and gate/up in every layer of `model` that can, and store a quantized AltUp
    router dense (see the modules' `fuse_projections`)."""
    for module in list(model.modules()):
        if hasattr(module, "fuse_projections"):
            module.fuse_projections()
