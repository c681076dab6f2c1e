"""Built-in models kept as packages: a built-in that is a folder quantized at load (pocketvlm-scenes) is
converted once, at its default mode, into a package in the cache, so later loads read the kernel layout instead
of quantizing and repacking again. A built-in VLM's package is calibrated (GPTQ rounding on generated training
scenes): round-to-nearest cost it up to 3 points of accuracy on colours, counts and yes/no questions, GPTQ keeps
every question type within 1.5 points of float32 (README, "The deployed form")."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..real_models import DEFAULT_QUANTIZATION, PACKAGED, SCENES_MODEL, cache_dir, resolve_part

#: How a built-in's package is calibrated: GPTQ (no block-wise tuning) on the conversations of this many
#: generated training scenes of this seed (the training seed: never the held-out evaluation seed, 1).
CALIBRATION = {SCENES_MODEL: {"scenes": 64, "seed": 0, "tune_steps": 0}}


def packaged_source(source, quantization: str | None):
    """The cached package of built-in ``source`` when it is asked for at its default ``quantization``
    (:func:`packaged_path`), else None (load ``source`` as it is). A local path of the same name wins."""
    if (isinstance(source, str) and source in PACKAGED and quantization == DEFAULT_QUANTIZATION.get(source)
            and not Path(source).expanduser().exists()):
        return packaged_path(source, quantization)
    return None


def packaged_path(name: str, mode: str) -> Path:
    """The built-in model ``name`` as a ``mode`` package, converted once from its folder (with progress bars)
    and again when that folder, its calibration or the stored layout changes: float32 float tensors and, for
    a built-in in :data:`CALIBRATION`, GPTQ-calibrated rounding (``pocketvlm convert --calibrate``); RTN scales
    (the very weights ``load(folder, quantization=mode)`` makes) otherwise, or where the machine's available
    memory is short of what calibrating needs (with a warning)."""
    from ..quant.linear import KERNEL_LAYOUT
    from .convert import convert

    src = resolve_part(name)
    weights = src / "model.safetensors"

    def key(cal):
        return {"source": str(src), "size": weights.stat().st_size, "mtime_ns": weights.stat().st_mtime_ns,
                "mode": mode, "scales": "gptq" if cal else "rtn", "calibration": cal, "dtype": "float32",
                "layout": KERNEL_LAYOUT}

    cal = CALIBRATION.get(name)
    out, stamp = cache_dir() / f"{name}-{mode}", cache_dir() / f"{name}-{mode}.json"
    if out.is_dir() and stamp.exists() and json.loads(stamp.read_text()) in (key(cal), key(None)):
        return out
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    with tempfile.TemporaryDirectory(prefix=f"{name}-calibration-", dir=cache_dir()) as data:
        conversations = _calibration_data(name, src, mode, cal, Path(data), stamp) if cal else None
        if conversations is None:
            cal = None
            convert(src, mode, tmp, dtype="float32", scales="rtn", overwrite=True)
        else:
            print(f"calibrating {name}'s {mode} weights once (GPTQ on {cal['scenes']} generated scenes; ~8 minutes "
                  f"on 2 CPU cores, then every start loads the result) ...", file=sys.stderr)
            convert(src, mode, tmp, dtype="float32", calibrate=conversations, calibration_windows=cal["scenes"],
                    tune_steps=cal["tune_steps"], e2e_steps=0, overwrite=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    stamp.write_text(json.dumps(key(cal)))
    return out


def _calibration_data(name, src, mode, cal, folder: Path, stamp: Path):
    """The generated calibration conversations (``folder/instruct.json``, for ``convert``), or None with a
    warning when this machine's available memory is short of what calibrating needs (checked first: the
    estimate depends on the number of conversations, not on their content)."""
    import warnings

    from ..scenes import write_dataset
    from . import calibration

    data = folder / "instruct.json"
    short = calibration.memory_shortfall(src, mode, calibration.CalibrationImages(
        data, cal["scenes"], "", cal["tune_steps"], e2e_steps=0))
    if short:
        warnings.warn(f"{short}: the built-in {name} is quantized with round-to-nearest scales instead (up to 3 "
                      f"points less accurate on some question types). With more memory free, delete {stamp} to "
                      "redo it.", stacklevel=3)
        return None
    write_dataset(folder, cal["scenes"], seed=cal["seed"], progress=False)
    return data
