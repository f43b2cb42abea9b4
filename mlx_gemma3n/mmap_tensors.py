"""Memory-mapped tensors straight from safetensors files, and a streaming safetensors writer.

`mx.load` is lazy, but evaluating any slice of a tensor reads all of it. For tables that must
never be resident (the per-layer embeddings) we map the file with numpy and read only the
rows asked for; the OS pages them in on demand and may drop them again.
"""

import json
import mmap
import struct
from pathlib import Path
from typing import Dict, Iterable, Tuple, Union

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


class MappedTensor:
    """A read-only tensor in a safetensors file; `rows(ids)` reads just those rows."""

    def __init__(self, file: Path, dtype: str, shape: Tuple[int, ...], offset: int):
        if dtype not in DTYPES:
            raise ValueError(f"{file}: unsupported dtype {dtype} for a memory-mapped tensor")
        self.shape = tuple(shape)
        storage, self.dtype = DTYPES[dtype]
        self.array = _map(file, np.dtype(storage), self.shape, offset)

    def rows(self, ids: Union[np.ndarray, slice]) -> mx.array:
        """Rows `ids` (an index array of any shape, or a slice) -> mx.array."""
        picked = self.array[ids] if isinstance(ids, slice) else self.array[np.asarray(ids)]
        out = mx.array(np.ascontiguousarray(picked))
        return out.view(self.dtype) if self.dtype == mx.bfloat16 else out


def _map(file: Path, dtype: np.dtype, shape: Tuple[int, ...], offset: int) -> np.ndarray:
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    length = offset - start + int(np.prod(shape)) * dtype.itemsize
    with open(file, "rb") as f:
        mapping = mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=start)
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        # Rows are read in token order, i.e. at random: without this the kernel reads ahead
        # and maps whole neighbourhoods (up to MBs per row) into the process.
        mapping.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapping, dtype, count=int(np.prod(shape)), offset=offset - start).reshape(shape)


def read_header(file: Path) -> Tuple[dict, int]:
    """(header dict, byte offset where tensor data starts)."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{file} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        header = f.read(n)
    if len(header) < n:
        raise ValueError(f"{file} is truncated (header cut short)")
    return json.loads(header), 8 + n


def map_tensors(files: Iterable[Path], names: Iterable[str]) -> Dict[str, MappedTensor]:
    """Memory-map the tensors called `names` wherever they are among `files`."""
    wanted, found = set(names), {}
    for file in files:
        header, data_start = read_header(file)
        size = Path(file).stat().st_size
        for name in wanted & set(header):
            info = header[name]
            begin, end = info["data_offsets"]
            if data_start + end > size:
                raise ValueError(f"{file} is truncated: tensor {name} runs past the end")
            found[name] = MappedTensor(Path(file), info["dtype"], info["shape"], data_start + begin)
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
