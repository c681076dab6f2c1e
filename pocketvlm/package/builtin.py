"""Built-in models kept as packages: a built-in that is a folder quantized at load (pocketvlm-scenes) is
converted once, at its default mode, into a package in the cache, so later loads read the kernel layout instead
of quantizing and repacking again."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..real_models import DEFAULT_QUANTIZATION, PACKAGED, cache_dir, resolve_part


def packaged_source(source, quantization: str | None):
    """The cached package of built-in ``source`` when it is asked for at its default ``quantization``
    (:func:`packaged_path`), else None (load ``source`` as it is). A local path of the same name wins."""
    if (isinstance(source, str) and source in PACKAGED and quantization == DEFAULT_QUANTIZATION.get(source)
            and not Path(source).expanduser().exists()):
        return packaged_path(source, quantization)
    return None


def packaged_path(name: str, mode: str) -> Path:
    """The built-in model ``name`` as a ``mode`` package, converted once from its folder (with a progress bar)
    and again when that folder or the stored layout changes: RTN scales and float32 float tensors, so it holds
    the very weights ``load(folder, quantization=mode)`` makes (tests/test_scenes_model.py)."""
    from ..quant.linear import KERNEL_LAYOUT
    from .convert import convert

    src = resolve_part(name)
    weights = src / "model.safetensors"
    key = {"source": str(src), "size": weights.stat().st_size, "mtime_ns": weights.stat().st_mtime_ns,
           "mode": mode, "scales": "rtn", "dtype": "float32", "layout": KERNEL_LAYOUT}
    out, stamp = cache_dir() / f"{name}-{mode}", cache_dir() / f"{name}-{mode}.json"
    if out.is_dir() and stamp.exists() and json.loads(stamp.read_text()) == key:
        return out
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    convert(src, mode, tmp, dtype="float32", scales="rtn", overwrite=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    stamp.write_text(json.dumps(key))
    return out
