"""Where a model comes from: a local Hugging Face folder, a llama.cpp ``.gguf`` file, a pocketvlm package
folder (``manifest.json``) or a Hugging Face repo id (downloaded with ``huggingface_hub``). Built-in names
(``pocketvlm.real_models``) are resolved a layer above, by :func:`pocketvlm.real_models.resolve_source`."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ModelNotFoundError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(source: str | os.PathLike) -> tuple[str, Path]:
    """("hf", folder) or ("gguf", file) for a path or a hub repo id (downloaded)."""
    s = str(source)
    p = Path(s).expanduser()
    if p.is_dir():
        if (p / "config.json").exists():
            return "hf", p
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise ModelNotFoundError(f"{p} has no config.json: not a Hugging Face model folder")
    if p.is_file():
        if p.suffix == ".gguf" or _is_gguf(p):
            return "gguf", p
        if p.name == "config.json":
            return "hf", p.parent
        raise ModelNotFoundError(f"{p} is neither a model folder nor a .gguf file")
    if _REPO_ID.match(s) and not s.startswith((".", "/", "~")):
        return "hf", download(s)
    raise ModelNotFoundError(f"model {s!r} not found: no such file or folder, and not a Hugging Face repo id")


def _is_gguf(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def download(repo_id: str, revision: str | None = None) -> Path:
    """Download (or reuse from the HF cache) the files pocketvlm needs from a Hugging Face repo."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - dependency is declared
        raise ModelNotFoundError("huggingface_hub is required to download models") from e
    patterns = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except LocalEntryNotFoundError as e:
        raise ModelNotFoundError(
            f"cannot download {repo_id!r}: the Hugging Face hub is unreachable (offline?) and the model is not "
            "in the local cache; pass a local folder or .gguf file instead") from e
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise ModelNotFoundError(f"cannot download {repo_id!r} from the Hugging Face hub: {e}") from e
    return Path(path)

