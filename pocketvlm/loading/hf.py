"""Hugging Face folders: ``config.json``, the image processor's settings, single or sharded
``*.safetensors`` read through safetensors' mmap (never pickle)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ConfigError, CorruptWeightsError, ModelNotFoundError
from ..models import registry
from .core import Loaded, build

def read_config(folder: Path) -> dict:
    f = folder / "config.json"
    if not f.exists():
        raise ModelNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f} is not valid JSON: {e}") from e
    if not isinstance(d, dict) or "model_type" not in d:
        raise ConfigError(f"{f} has no model_type")
    return d


def image_processor_dict(folder: Path) -> dict | None:
    """The image processor's settings of an HF folder: ``preprocessor_config.json``, or (transformers >= 5's
    ``save_pretrained`` of a processor) the ``image_processor`` entry of ``processor_config.json``, with the
    processor's own keys (``processor_class``, ``patch_size``, ...) beside it; None if neither exists."""
    f, p = Path(folder) / "preprocessor_config.json", Path(folder) / "processor_config.json"
    try:
        if f.is_file():
            return json.loads(f.read_text())
        if p.is_file():
            d = json.loads(p.read_text())
            nested = d.get("image_processor") if isinstance(d, dict) else None
            if isinstance(nested, dict):
                outer = {k: v for k, v in d.items() if not isinstance(v, dict)}
                return {**outer, **nested}
    except json.JSONDecodeError as e:
        raise ConfigError(f"{folder}: the image processor configuration is not valid JSON: {e}") from e
    return None


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CorruptWeightsError(f"shards listed in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{folder} has no *.safetensors weights (pickled .bin weights are not loaded)")
    return files


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptWeightsError(f"{f} is not a valid safetensors file (truncated or corrupt?): {e}") from e
    return weights


def load_hf(folder: Path, *, device="cpu", dtype=torch.float32, max_seq_len: int | None = None) -> Loaded:
    d = read_config(folder)
    fam = registry.family(d["model_type"])
    cfg = fam.Config.from_dict(d)
    weights = fam.sanitize(read_safetensors(safetensors_files(folder)), cfg)
    model = build(fam, cfg, weights, device=device, dtype=dtype, max_seq_len=max_seq_len)
    return Loaded(model, cfg, fam, str(folder), "hf", folder, d)

