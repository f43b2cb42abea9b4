"""The per-layer embedding (PLE) table, read from the checkpoint file row by row.

In E2B it holds ~2B of the 5B parameters (262144 tokens x 30 layers x 256), yet a step only
needs the rows of the tokens it processes, so it is never loaded: rows are read from the
checkpoint file on demand (one contiguous read per token per tensor) and dequantized.
"""

import copy
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from ..file_tensors import FileTensor, find_tensors
from ..layouts import checkpoint_key

NAME = "language_model.embed_tokens_per_layer"
PARTS = ("weight", "scales", "biases")


class ReadRows(NamedTuple):
    """Rows read from the file for some ids: each part's rows for the distinct ids, in
    storage dtypes, and where each id's row is among them."""

    parts: List[np.ndarray]
    inverse: np.ndarray


class PerLayerEmbeddingTable:
    def __init__(
        self,
        weight: FileTensor,
        scales: Optional[FileTensor] = None,
        biases: Optional[FileTensor] = None,
        group_size: int = 64,
        bits: int = 8,
        mode: str = "affine",
    ):
        self.weight, self.scales, self.biases = weight, scales, biases  # no biases outside "affine"
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.num_rows = weight.shape[0]
        self.dims = weight.shape[1] * 32 // bits if scales is not None else weight.shape[1]
        self.columns: Optional[np.ndarray] = None

    def select_layers(self, layers: Iterable[int], per_layer_dims: int) -> "PerLayerEmbeddingTable":
        """A view holding only the columns of `layers` (for MatFormer layer skipping)."""
        view = copy.copy(self)
        view.columns = np.concatenate([np.arange(i * per_layer_dims, (i + 1) * per_layer_dims) for i in layers])
        if self.columns is not None:
            view.columns = self.columns[view.columns]
        view.dims = len(view.columns)
        return view

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    @classmethod
    def from_files(cls, files: Iterable[Path], quantization: Optional[dict]) -> "PerLayerEmbeddingTable":
        """Find the table in the checkpoint shards (any layout), to be read by row;
        `quantization` holds its parameters if it is stored quantized."""
        found = find_tensors(files, [f"{NAME}.{p}" for p in PARTS], checkpoint_key)
        mapped = {k.rsplit(".", 1)[1]: v for k, v in found.items()}
        if "weight" not in mapped:
            raise KeyError(f"checkpoint lacks {NAME}.weight")
        if "scales" not in mapped:
            return cls(mapped["weight"])
        if quantization is None:
            raise ValueError(f"{NAME} is stored quantized but config.json does not quantize it")
        return cls(mapped["weight"], mapped["scales"], mapped.get("biases"), **quantization)

    def __call__(self, ids: mx.array) -> mx.array:
        """Rows for `ids` (any shape) -> [*ids.shape, dims], dequantized. A repeated id is
        read and dequantized once."""
        return self.gather(self.read(np.array(ids)))

    def read(self, ids: np.ndarray) -> ReadRows:
        """The stored rows of `ids`' distinct values, read from the file: host work only (no
        MLX), so a prefill reads the next chunk's on a thread while it builds this one."""
        unique, inverse = np.unique(ids, return_inverse=True)
        return ReadRows([t.stored_rows(unique) for t in self.parts], inverse.reshape(ids.shape))

    def gather(self, read: ReadRows) -> mx.array:
        """`read`'s rows, dequantized, in the order of its ids: [*ids.shape, dims]."""
        return self.from_stored([mx.array(part) for part in read.parts])[mx.array(read.inverse)]

    @property
    def parts(self) -> List[FileTensor]:
        """The stored tensors a row is made of: weight, then scales and biases if quantized."""
        return [t for t in (self.weight, self.scales, self.biases) if t is not None]

    def rows(self, ids: Union[np.ndarray, slice]) -> mx.array:
        return self.from_stored(self.stored_rows(ids))

    def stored_rows(self, ids: Union[np.ndarray, slice]) -> List[mx.array]:
        """Rows `ids` as their `parts` store them (storage dtypes), read from the file."""
        return [mx.array(t.stored_rows(ids)) for t in self.parts]

    def from_stored(self, stored: Sequence[mx.array]) -> mx.array:
        """Rows from their `parts` as stored (storage dtypes) -> dequantized rows."""
        w, *quant = (t.typed(a) for t, a in zip(self.parts, stored))
        if quant:
            scales, biases = quant if len(quant) == 2 else (quant[0], None)
            w = mx.dequantize(w, scales, biases, group_size=self.group_size, bits=self.bits, mode=self.mode)
        return w if self.columns is None else w[..., mx.array(self.columns)]

    def blocks(self, rows_per_block: int = 8192) -> Iterator[mx.array]:
        """The whole table, dequantized, a block of rows at a time (for conversion)."""
        for start in range(0, self.num_rows, rows_per_block):
            yield self.rows(slice(start, min(start + rows_per_block, self.num_rows)))


def quantize_blocks(
    table: PerLayerEmbeddingTable, dtype: mx.Dtype, group_size: int, bits: int
) -> Iterator[Dict[str, mx.array]]:
    """Blocks of the table cast to `dtype` and, if `bits`, affine-quantized row-wise."""
    for block in table.blocks():
        block = block.astype(dtype)
        if not bits:
            yield {f"{NAME}.weight": block}
            continue
        w, scales, biases = mx.quantize(block, group_size=group_size, bits=bits)
        yield {f"{NAME}.weight": w, f"{NAME}.scales": scales, f"{NAME}.biases": biases}


class StoredRow:
    """One token's row parts as stored, in MLX arrays whose memory `read` overwrites in place.

    A graph can be built on these arrays before the token is known (the next decode step,
    queued behind the one that samples the token) and the row read into them afterwards: an
    evaluation reads what the memory holds when it runs, so the caller must not `read` again
    while a graph that reads the previous row is still to be evaluated."""

    def __init__(self, table: PerLayerEmbeddingTable):
        self.table = table
        self.arrays = [mx.array(np.zeros((1, *t.shape[1:]), t.storage)) for t in table.parts]
        mx.eval(self.arrays)
        self._memory = [np.asarray(memoryview(a)) for a in self.arrays]  # the arrays' own memory

    def read(self, token_id: int) -> None:
        for tensor, memory in zip(self.table.parts, self._memory):
            tensor.read_into(memory, token_id)


def in_place_reads_work() -> bool:
    """Whether a graph on the default device, built before the host writes into an array's
    memory, sees the write (unified memory: Apple silicon, the CPU; MLX-CUDA's managed
    memory). Checked once per device; where it fails, rows are read before each step."""
    device = str(mx.default_device())
    if device not in _IN_PLACE:
        a = mx.array(np.zeros(4, np.uint32))
        mx.eval(a)
        built = a * 1
        try:
            np.asarray(memoryview(a))[:] = np.arange(1, 5)
            _IN_PLACE[device] = built.tolist() == [1, 2, 3, 4]
        except (BufferError, TypeError, ValueError):
            _IN_PLACE[device] = False
    return _IN_PLACE[device]


_IN_PLACE: Dict[str, bool] = {}
