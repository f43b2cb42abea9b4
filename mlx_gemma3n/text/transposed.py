"""A bias-free linear layer stored transposed, [input_dims, output_dims].

The converter stores down_proj this way on the activation-sparse layers: a hidden unit's
weights are then one contiguous row (quantized along the output dims), which is what the
sparse FFN kernel reads for the few units that survive the gaussian top-k."""

import mlx.core as mx
import mlx.nn as nn

from ..quantized import quantized_matmul


class TransposedLinear(nn.Module):
    """y = x @ weight, weight [input_dims, output_dims]."""

    def __init__(self, input_dims: int, output_dims: int):
        super().__init__()
        scale = input_dims**-0.5
        self.weight = mx.random.uniform(-scale, scale, (input_dims, output_dims))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "TransposedLinear":
        out_dims, in_dims = linear.weight.shape
        layer = cls(in_dims, out_dims)
        layer.weight = linear.weight.T
        return layer

    def __call__(self, x: mx.array) -> mx.array:
        return x @ self.weight

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        """For nn.quantize: the quantized layer, groups along the output dims."""
        if mode != "affine":
            raise ValueError(f"TransposedLinear quantizes in affine mode only, not {mode!r}")
        layer = QuantizedTransposedLinear(*self.weight.shape, group_size, bits)
        layer.weight, layer.scales, layer.biases = mx.quantize(self.weight, group_size, bits)
        return layer


class QuantizedTransposedLinear(nn.Module):
    """TransposedLinear with affine-quantized weights (groups along output_dims)."""

    def __init__(self, input_dims: int, output_dims: int, group_size: int = 64, bits: int = 4):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, "affine"
        self.weight, self.scales, self.biases = mx.quantize(
            mx.zeros((input_dims, output_dims)), group_size, bits
        )
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        return quantized_matmul(x, self["weight"], self["scales"], self["biases"], False,
                                self.group_size, self.bits)
