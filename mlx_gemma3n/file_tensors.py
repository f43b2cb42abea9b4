"""Tensors read straight from safetensors files by row, and a streaming safetensors writer.

`mx.load` is lazy, but evaluating any slice of a tensor reads all of it. For tables that must
never be resident (the per-layer embeddings) we read only the rows asked for, each with one
positional read (`os.pread`). Not `mmap`: touching a mapped page also maps its cached
neighbours into the process ("fault-around", 64 kB per touch on Linux), so gathering 2K
random rows of E4B's table by mmap added ~170 MB of resident file pages. A read copies just
the row; the pages stay in the OS page cache, shared and reclaimable, never in our RSS.
"""

import json
import os
import struct
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple, Union

import mlx.core as mx
import numpy as np

# safetensors dtype -> (numpy storage dtype, mlx dtype); bfloat16 is stored as raw uint16.
DTYPES = {
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),
    "U32": (np.uint32, mx.uint32),
    "U8": (np.uint8, mx.uint8),
}
NAMES = {mlx: name for name, (_, mlx) in DTYPES.items()}
# Bytes per element of every safetensors dtype, for checking the layout of any file.
ITEMSIZES = {
    **{t: 1 for t in ("BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2")},
    **{t: 2 for t in ("U16", "I16", "F16", "BF16")},
    **{t: 4 for t in ("U32", "I32", "F32")},
    **{t: 8 for t in ("U64", "I64", "F64", "C64")},
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


class FileTensor:
    """A read-only tensor in a safetensors file; `rows(ids)` reads just those rows."""

    def __init__(self, file: Path, dtype: str, shape: Tuple[int, ...], offset: int):
        if dtype not in DTYPES:
            raise ValueError(f"{file}: unsupported dtype {dtype} for a row-read tensor")
        self.file, self.shape, self.offset = file, tuple(shape), offset
        storage, self.dtype = DTYPES[dtype]
        self.storage = np.dtype(storage)
        self.row_bytes = int(np.prod(self.shape[1:])) * self.storage.itemsize
        self._handle = open(file, "rb")  # closed with the tensor

    def rows(self, ids: Union[np.ndarray, slice]) -> mx.array:
        """Rows `ids` (an index array of any shape, or a slice) -> mx.array. Each id is one
        read: callers gathering repeated ids deduplicate first."""
        return self.typed(mx.array(self.stored_rows(ids)))

    def typed(self, stored: mx.array) -> mx.array:
        """An array of this tensor's storage dtype (what `stored_rows` reads) as its dtype."""
        return stored.view(self.dtype) if self.dtype == mx.bfloat16 else stored

    def stored_rows(self, ids: Union[np.ndarray, slice]) -> np.ndarray:
        """`rows` as the file stores them (numpy, bfloat16 as raw uint16)."""
        if isinstance(ids, slice):
            start, stop, step = ids.indices(self.shape[0])
            if step != 1:
                raise ValueError("row slices must be contiguous")
            return self.read_into(np.empty((max(stop - start, 0), *self.shape[1:]), self.storage), start)
        ids = np.asarray(ids)
        picked = np.empty((ids.size, *self.shape[1:]), self.storage)
        for j, i in enumerate(ids.ravel().tolist()):
            self.read_into(picked[j : j + 1], i)
        return picked.reshape(*ids.shape, *self.shape[1:])

    def read_into(self, out: np.ndarray, start: int) -> np.ndarray:
        """Read rows start, start+1, ... into `out` (C-contiguous, storage dtype, whole rows)."""
        count = out.nbytes // self.row_bytes
        if not (0 <= start and start + count <= self.shape[0]):
            raise IndexError(f"row ids must lie in [0, {self.shape[0]}) for {self.file}")
        view = memoryview(out).cast("B")
        position, got = self.offset + start * self.row_bytes, 0
        while got < len(view):  # a read may return less (Linux caps one at ~2 GB)
            data = os.pread(self._handle.fileno(), len(view) - got, position + got)
            if not data:
                raise ValueError(f"{self.file} is truncated: rows {start}..{start + count} run past the end")
            view[got : got + len(data)] = data
            got += len(data)
        return out


def read_header(file: Path) -> Tuple[dict, int]:
    """(header dict, byte offset where tensor data starts), after checking that the tensors
    tile the data exactly, as the safetensors format requires (and its own library checks;
    `mx.load` does not: overlapping offsets would silently alias one tensor to another)."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{file} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"{file} is not a safetensors file (header size {n} bytes)")
        header = f.read(n)
    if len(header) < n:
        raise ValueError(f"{file} is truncated (header cut short)")
    try:
        header = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{file} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file} is not a safetensors file (its header is not a JSON object)")
    _check_layout(file, header, Path(file).stat().st_size - 8 - n)
    return header, 8 + n


def _check_layout(file: Path, header: dict, data_size: int) -> None:
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            itemsize, shape, (begin, end) = ITEMSIZES[info["dtype"]], info["shape"], info["data_offsets"]
            nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{file}: tensor {name} has a malformed header entry: {info!r:.200}") from None
        if end - begin != nbytes:
            raise ValueError(f"{file}: tensor {name} has data_offsets {[begin, end]} for {nbytes} bytes of data")
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise ValueError(
                f"{file}: tensors {first} and {second} overlap; the safetensors format forbids "
                "overlapping data_offsets (one tensor would silently read another's bytes)"
            )
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise ValueError(f"{file}: a gap of {begin - position} bytes before tensor {name}; the safetensors format forbids gaps")
        position = end
    if position > data_size:
        raise ValueError(f"{file} is truncated: its tensors need {position} bytes of data, it holds {data_size}")
    if position < data_size:
        raise ValueError(f"{file} has {data_size - position} bytes after its last tensor (not a valid safetensors file)")


def find_tensors(
    files: Iterable[Path], names: Iterable[str], rename: Callable[[str], Optional[str]] = lambda k: k
) -> Dict[str, FileTensor]:
    """The tensors whose stored name maps to one of `names` under `rename`, wherever they are
    among `files`, for reading by row; keyed by the mapped name."""
    wanted, found = set(names), {}
    for file in files:
        header, data_start = read_header(file)
        for stored in header:
            name = rename(stored)
            if name not in wanted:
                continue
            info = header[stored]
            found[name] = FileTensor(Path(file), info["dtype"], info["shape"], data_start + info["data_offsets"][0])
    return found


def write_streaming(
    file: Path,
    specs: Dict[str, Tuple[mx.Dtype, tuple]],
    blocks: Iterable[Dict[str, mx.array]],
) -> None:
    """Write a safetensors file whose tensors arrive as consecutive row blocks, so no tensor
    is ever whole in memory. `specs[name] = (dtype, shape)`; each item of `blocks` maps some
    of the names to their next rows."""
    header, offset = {}, 0
    for name, (dtype, shape) in specs.items():
        nbytes = int(np.prod(shape)) * dtype.size
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
    start = 8 + len(raw)
    position = {name: start + h["data_offsets"][0] for name, h in header.items()}
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(start + offset)
        for block in blocks:
            for name, rows in block.items():
                dtype = specs[name][0]
                rows = rows.astype(dtype)
                data = np.array(rows.view(mx.uint16) if dtype == mx.bfloat16 else rows)
                f.seek(position[name])
                f.write(data.tobytes())
                position[name] += data.nbytes
    for name, h in header.items():
        if position[name] != start + h["data_offsets"][1]:
            raise RuntimeError(f"streamed {position[name] - start - h['data_offsets'][0]} bytes "
                               f"for {name}, expected {h['data_offsets'][1] - h['data_offsets'][0]}")
