"""Which module implements which architecture: explicit tables, no guessing from names or paths."""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import UnsupportedArchitectureError

# Hugging Face ``model_type`` -> family module (under pocketvlm.models).
FAMILIES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "llava": "llava",
    "llava_onevision": "llava_onevision",
    "mobilevlm": "mobilevlm",
    "clip_vision_model": "clip",
    "siglip_vision_model": "siglip",
    "dinov2": "dinov2",
}

# Architectures that are the same as a family above under another name.
ALIASES = {
    "mistral": "llama",
    "mobilellama": "llama",
    "tinyllama": "llama",
}

# llama.cpp ``general.architecture`` -> family module.
GGUF_FAMILIES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "phi3": "phi3",
}


def supported() -> list[str]:
    return sorted(set(FAMILIES) | set(ALIASES))


def family(model_type: str) -> ModuleType:
    """The module implementing HF ``model_type``; an unknown one lists the supported ones."""
    name = FAMILIES.get(model_type) or ALIASES.get(model_type)
    if name is None:
        raise UnsupportedArchitectureError(
            f"unknown architecture {model_type!r}; supported: {', '.join(supported())}")
    try:
        return importlib.import_module(f"pocketvlm.models.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"pocketvlm.models.{name}":
            raise UnsupportedArchitectureError(f"architecture {model_type!r} is not available in this build") from e
        raise


def gguf_family(arch: str) -> ModuleType:
    name = GGUF_FAMILIES.get(arch)
    if name is None:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(GGUF_FAMILIES))}")
    return importlib.import_module(f"pocketvlm.models.{name}")
