"""What a model needs besides its weights: its tokenizer and (a VLM) its image preprocessing."""
from __future__ import annotations

from pathlib import Path

from .core import Loaded
from .hf import image_processor_dict


def load_tokenizer(loaded: Loaded):
    """The tokenizer of a loaded model: rebuilt from a GGUF's metadata, else the folder's tokenizer files."""
    from ..tokenizer import Tokenizer

    if loaded.kind == "gguf":
        return Tokenizer.from_gguf(loaded.gguf_metadata if loaded.gguf_metadata is not None else loaded.path)
    return Tokenizer.from_folder(loaded.path)


def load_image_processor(loaded: Loaded):
    """A VLM's image preprocessing: the source's settings (folder, mmproj file), else the family's default, else None."""
    from ..image import ImageProcessorConfig

    d = loaded.image_processor
    if d is None and loaded.kind in ("hf", "package"):
        d = image_processor_dict(Path(loaded.path))
    if d is not None:
        return ImageProcessorConfig.from_dict(d)
    default = getattr(loaded.model, "default_image_processor", None)
    return default() if callable(default) else None
