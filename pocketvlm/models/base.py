"""What every family shares: config plumbing (frozen dataclasses built from a Hugging Face ``config.json``
dict) and the contract a vision-language model offers the engine (:class:`VisionLanguageModel`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol, TypeVar, runtime_checkable

from ..errors import ConfigError

C = TypeVar("C")


def from_dict(cls: type[C], d: dict[str, Any], **overrides: Any) -> C:
    """Build the dataclass ``cls`` from ``d``: unknown keys are ignored, missing required keys are a clear error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in fields}
    kw.update(overrides)
    missing = [
        name for name, f in fields.items()
        if name not in kw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        kind = d.get("model_type", cls.__name__)
        raise ConfigError(f"config for {kind!r} lacks required key(s): {', '.join(missing)}")
    # JSON lists become tuples so the frozen configs stay hashable and immutable.
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    return cls(**kw)


def rope_parameters(d: dict[str, Any], default_theta: float = 10000.0) -> dict[str, Any]:
    """RoPE settings from either config style: transformers>=5 ``rope_parameters`` or ``rope_theta`` + ``rope_scaling``."""
    if isinstance(d.get("rope_parameters"), dict) and "rope_theta" in d["rope_parameters"]:
        p = dict(d["rope_parameters"])
    else:
        p = dict(d.get("rope_scaling") or {})
        p["rope_theta"] = d.get("rope_theta", default_theta)
    p["rope_type"] = p.get("rope_type", p.get("type", "default")) or "default"
    p.pop("type", None)
    return p


@runtime_checkable
class VisionLanguageModel(Protocol):
    """What a VLM family's ``Model`` offers on top of the text-model contract (``forward``, ``make_cache``,
    ``get_input_embeddings``): ``llava`` implements it once (any tower: CLIP, SigLIP, DINOv2), and
    ``llava_onevision`` (tiles, newline rows) and ``mobilevlm`` (its names, LDP projectors) override parts.

    The engine's whole use of images: preprocess (:mod:`pocketvlm.image`), ``encode_images`` once per distinct
    image (the API caches the features by content hash), expand each placeholder to ``num_image_tokens``
    slots of ``image_token_id``, and ``embed`` the ids with the features spliced in (one splice, in llava)."""

    @property
    def image_token_id(self) -> int: ...

    def encode_images(self, pixel_values, image_sizes=None):
        """Pixel values -> projected features, ``[n_images, n_tokens, hidden]`` or a list of ``[n_tokens_i, hidden]``."""

    def num_image_tokens(self, image_size=None) -> int:
        """Feature rows one image of (height, width) ``image_size`` takes in the prompt."""

    def embed(self, input_ids, image_features):
        """Token embeddings of ``input_ids`` with the image-token rows replaced, in order, by the features."""


def is_vlm(model) -> bool:
    """Whether ``model`` takes images (implements :class:`VisionLanguageModel`)."""
    return isinstance(model, VisionLanguageModel)
