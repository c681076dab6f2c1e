"""A fast, read-only view of a llama.cpp GGUF file: metadata as Python values and tensors as memory-mapped
byte arrays, without ``gguf.GGUFReader``'s per-element parsing of the vocabulary (which dominated load time).
:func:`read_gguf_metadata` reads the key/value section alone (what a tokenizer needs).

Tensor ``data`` arrays have the layout ``gguf.GGUFReader`` gives (quantized: ``uint8 [rows..., bytes per row]``;
float types: their numpy dtype with the dimensions reversed), so :mod:`pocketvlm.quant.gguf_blocks` takes either.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptWeightsError, ModelNotFoundError

_FLOAT = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


# --- metadata (the key/value section) ------------------------------------------------------------------

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}


def _map_file(path: Path) -> mmap.mmap:
    """The whole file mapped read-only, with clear errors for a missing or empty file."""
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {path}; pass the path of an existing .gguf file")
    with open(path, "rb") as f:
        try:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # an empty file
            raise CorruptWeightsError(f"{path} is empty, not a GGUF file; re-download it") from e


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (v2/v3, little-endian) as Python values.

    Much faster than ``gguf.GGUFReader`` for tokenizer use: string arrays become lists of str,
    numeric arrays numpy arrays.
    """
    path = Path(path)
    buf = _map_file(path)
    try:
        return parse_kv(buf, path)
    except (struct.error, IndexError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, CorruptWeightsError):
            raise
        raise CorruptWeightsError(f"{path}: truncated or malformed GGUF metadata ({e}); re-download the file") from e
    finally:
        buf.close()


def parse_kv(buf, path: Path, with_end: bool = False):
    if buf[:4] != b"GGUF":
        raise CorruptWeightsError(f"{path} is not a GGUF file (bad magic {bytes(buf[:4])!r}); pass a .gguf file")
    version = struct.unpack_from("<I", buf, 4)[0]
    if version not in (2, 3):
        raise CorruptWeightsError(f"{path}: unsupported GGUF version {version} (expected 2 or 3, little-endian)")
    n_kv = struct.unpack_from("<Q", buf, 16)[0]
    pos = 24
    size = len(buf)

    def read_str(pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, pos)
        end = pos + 8 + n
        if end > size:
            raise CorruptWeightsError(f"{path}: string runs past the end of the file; the file is truncated")
        return bytes(buf[pos + 8:end]).decode("utf-8"), end

    def read_val(t: int, pos: int):
        if t == 8:
            return read_str(pos)
        if t == 9:
            it, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if it == 8:
                out = []
                for _ in range(n):
                    s, pos = read_str(pos)
                    out.append(s)
                return out, pos
            if it not in _NP:
                raise CorruptWeightsError(f"{path}: unknown GGUF array type {it}")
            dt = np.dtype(_NP[it])
            end = pos + n * dt.itemsize
            if end > size:
                raise CorruptWeightsError(f"{path}: array runs past the end of the file; the file is truncated")
            arr = np.frombuffer(buf, dtype=dt, count=n, offset=pos).copy()
            return (arr.astype(bool) if it == 7 else arr), end
        if t not in _SCALAR:
            raise CorruptWeightsError(f"{path}: unknown GGUF value type {t}")
        (v,) = struct.unpack_from(_SCALAR[t], buf, pos)
        return v, pos + struct.calcsize(_SCALAR[t])

    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = read_str(pos)
        (t,) = struct.unpack_from("<I", buf, pos)
        meta[key], pos = read_val(t, pos + 4)
    return (meta, pos) if with_end else meta


def metadata_from_reader(reader) -> dict[str, Any]:
    """Key/values of a ``gguf.GGUFReader`` (only the ones we need, converted like read_gguf_metadata)."""
    meta = {}
    for key, fld in reader.fields.items():
        if not (key.startswith("tokenizer.") or key.startswith("general.")):
            continue
        val = fld.contents()
        if isinstance(val, list) and val and not isinstance(val[0], str):
            val = np.asarray(val)
        meta[key] = val
    return meta


# --- tensors ------------------------------------------------------------------------------------------

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

    path = Path(path)
    mapped = _map_file(path)
    mm = np.frombuffer(mapped, dtype=np.uint8)  # read-only, like np.memmap(mode="r")
    buf = memoryview(mm)
    size = len(mm)
    try:
        meta, pos = parse_kv(buf, path, with_end=True)
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
