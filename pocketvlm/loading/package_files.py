"""The on-disk form of a package: safetensors shards written and read without mmap, and the manifest.

A package folder holds ``config.json`` (HF config + a ``"quantization"`` entry), ``model.safetensors``
(or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` above the shard size),
tokenizer files, ``preprocessor_config.json`` for a VLM, and ``manifest.json`` (sha256 and byte size of
every other file, parameter counts, the memory estimate).

Weights are read with plain ``readinto`` into tensors of their final size, not through safetensors'
mmap: a mapped file's touched pages count in the process's resident set until unmapped, which would
double the peak memory of a load (and the memory estimate is checked against that peak).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import PackageError

MANIFEST = "manifest.json"
FORMAT = "pocketvlm-package"
FORMAT_VERSION = 1
SHARD_BYTES = 2 * 1024 ** 3

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def write_shards(tensors: dict[str, torch.Tensor], folder: Path, shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Save ``tensors`` as one ``model.safetensors`` or HF-style shards plus an index; returns file names."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t.contiguous()
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names + ["model.safetensors.index.json"]


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / "model.safetensors"]


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data section) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise PackageError(f"{path} is not a readable safetensors file ({e}); re-run `pocketvlm convert`") from e
    header.pop("__metadata__", None)
    return header, 8 + n


def read_tensors(path: Path, want=None) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file, each read straight into its own buffer (see module docstring).
    ``want(name, dtype, shape)`` may return a dtype to convert to as the tensor is read."""
    header, base = read_header(path)
    size = path.stat().st_size
    out = {}
    with open(path, "rb") as f:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            dtype = _ST_DTYPES.get(info["dtype"])
            if dtype is None:
                raise PackageError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            if base + end > size:
                raise PackageError(f"{path} is truncated: tensor {name} ends at byte {base + end}, the file has {size}")
            t = torch.empty(info["shape"], dtype=dtype)
            nbytes = t.numel() * t.element_size()
            if nbytes != end - start:
                raise PackageError(f"{path}: tensor {name} has {end - start} bytes, its shape needs {nbytes}")
            f.seek(base + start)
            if nbytes and f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != nbytes:
                raise PackageError(f"{path} is truncated while reading {name}")
            target = want(name, dtype, tuple(info["shape"])) if want else None
            out[name] = t if target is None or target == dtype else t.to(target)
    return out


def file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def read_manifest(folder: Path) -> dict:
    f = folder / MANIFEST
    if not f.is_file():
        raise PackageError(f"{folder} has no {MANIFEST}: not a pocketvlm package (make one with `pocketvlm convert`)")
    try:
        m = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise PackageError(f"{f} is not valid JSON ({e}); the package is damaged, re-run `pocketvlm convert`") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("files"), dict):
        raise PackageError(f"{f} is not a pocketvlm package manifest (format {FORMAT!r} with a 'files' table expected)")
    return m


def verify_files(folder: Path, manifest: dict, *, full: bool = False) -> None:
    """Every listed file exists with its recorded size; with ``full``, also its sha256."""
    for name, entry in manifest["files"].items():
        p = folder / name
        if os.sep in name or "/" in name or name.startswith("."):
            raise PackageError(f"{MANIFEST} lists a file outside the package: {name!r}")
        if not p.is_file():
            raise PackageError(f"package file {name} is missing from {folder}; re-run `pocketvlm convert`")
        size = p.stat().st_size
        if size != entry["bytes"]:
            raise PackageError(f"package file {name} has {size} bytes, the manifest says {entry['bytes']} "
                               "(truncated or modified); re-run `pocketvlm convert`")
        if full and sha256(p) != entry["sha256"]:
            raise PackageError(f"package file {name} does not match its sha256 in the manifest (tampered or "
                               "corrupted); re-run `pocketvlm convert`")
