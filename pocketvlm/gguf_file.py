"""A fast, read-only view of a llama.cpp GGUF file: metadata as Python values and tensors as memory-mapped
byte arrays, without ``gguf.GGUFReader``'s per-element parsing of the vocabulary (which dominated load time).

Tensor ``data`` arrays have the layout ``gguf.GGUFReader`` gives (quantized: ``uint8 [rows..., bytes per row]``;
float types: their numpy dtype with the dimensions reversed), so :mod:`pocketvlm.quant.gguf_blocks` takes either.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CorruptWeightsError, ModelNotFoundError

_FLOAT = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: innermost dimension first
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray
    offset: int = 0  # where ``data`` starts in the file, and its length in bytes
    nbytes: int = 0


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    _map: mmap.mmap | None = field(default=None, repr=False)

    def release(self, tensor: GGUFTensor) -> None:
        """Unmap the pages of ``tensor``'s bytes from this process (they stay in the page cache, and reading
        ``tensor.data`` again maps them back). A loader that converts tensor by tensor calls this after each
        one, so the file's pages do not add up in the process's resident memory while the model is built."""
        if self._map is None or not tensor.nbytes or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = tensor.offset // mmap.PAGESIZE * mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, tensor.offset + tensor.nbytes - start)


def read_gguf(path: str | Path) -> GGUFFile:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from .tokenizer import _parse_kv

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # an empty file
            raise CorruptWeightsError(f"{path} is not a valid GGUF file: {e}") from e
    mm = np.frombuffer(mapped, dtype=np.uint8)  # read-only, like np.memmap(mode="r")
    buf = memoryview(mm)
    size = len(mm)
    try:
        meta, pos = _parse_kv(buf, path, with_end=True)
        n_tensors = struct.unpack_from("<Q", buf, 8)[0]
        infos = []
        for _ in range(n_tensors):
            (n,) = struct.unpack_from("<Q", buf, pos)
            name = bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8")
            pos += 8 + n
            (nd,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{nd}Q", buf, pos + 4)
            pos += 4 + 8 * nd
            ttype, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            infos.append((name, tuple(int(d) for d in dims), ttype, offset))
        align = int(meta.get("general.alignment", 32))
        start = (pos + align - 1) // align * align
        tensors = []
        for name, dims, ttype, offset in infos:
            qt = GGMLQuantizationType(ttype)
            block, bsize = GGML_QUANT_SIZES[qt]
            n_el = int(np.prod(dims)) if dims else 1
            nbytes = n_el // block * bsize
            begin = start + offset
            if begin + nbytes > size:
                raise CorruptWeightsError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
            raw = mm[begin:begin + nbytes]
            if ttype in _FLOAT:
                data = raw.view(_FLOAT[ttype]).reshape(tuple(reversed(dims)))
            elif ttype == 30:  # BF16
                data = raw.view(np.uint16).reshape(tuple(reversed(dims)))
            else:
                data = raw.reshape(*reversed(dims[1:]), dims[0] // block * bsize)
            tensors.append(GGUFTensor(name, dims, qt, data, begin, nbytes))
    except (struct.error, ValueError, IndexError, UnicodeDecodeError, KeyError) as e:
        if isinstance(e, CorruptWeightsError):
            raise
        raise CorruptWeightsError(f"{path} is not a valid GGUF file (truncated or corrupt?): {e}") from e
    return GGUFFile(path, meta, tensors, mapped)
