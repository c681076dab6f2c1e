"""MobileVLM / MobileVLM_V2 in the original Meituan-AutoML checkpoint layout (``MobileLlamaForCausalLM``).

The checkpoint is a Llama checkpoint (``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``)
whose ``model`` also holds ``vision_tower.vision_tower.vision_model.*`` (a CLIP ViT, ViT-L/14-336 in the
released models) and ``mm_projector.*`` (``mm_projector_type``: ``ldpnet`` for v1, ``ldpnetv2`` for v2; the
modules are :mod:`.projectors`'). Its config.json is a Llama config plus ``mm_*`` keys:
- the vision tower is named, not described (``mm_vision_tower``): its CLIP config comes from a
  ``vision_config`` entry if the file has one, else from the table of released towers below, else from
  ``<mm_vision_tower>/config.json`` when that is a local folder (as the original code allows);
- features are CLIP's ``mm_vision_select_layer`` (-2) hidden states, ``mm_vision_select_feature`` "patch"
  drops the class token ("cls_patch" keeps it);
- the original code marks the image with the out-of-vocabulary id -200 and replaces that one token with
  the image's feature rows; here the prompt carries one -200 per feature row
  (``num_image_tokens``), like the other VLMs, and ``embed`` splices them in order;
- images are padded to a square with the CLIP mean colour (``image_aspect_ratio="pad"``), then CLIP-processed.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from . import base, clip, llama, llava
from .projectors import ALIASES as PROJECTOR_ALIASES
from .projectors import build_projector

IMAGE_TOKEN_INDEX = -200

# CLIP configs of the towers the released MobileVLM checkpoints name (from their config.json on the hub).
KNOWN_VISION_TOWERS = {
    "openai/clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=336, patch_size=14,
                                              hidden_act="quick_gelu", layer_norm_eps=1e-5),
}


def vision_config_dict(d: dict) -> dict:
    if isinstance(d.get("vision_config"), dict):
        return d["vision_config"]
    name = d.get("mm_vision_tower")
    if not name:
        raise ConfigError("mobilevlm config lacks mm_vision_tower")
    if name in KNOWN_VISION_TOWERS:
        return KNOWN_VISION_TOWERS[name]
    local = Path(name) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    raise ConfigError(f"unknown MobileVLM vision tower {name!r} (known: {', '.join(KNOWN_VISION_TOWERS)}); add its "
                      "CLIP config to config.json as \"vision_config\"")


@dataclass(frozen=True)
class Config:
    model_type: str
    text_config: Any
    vision_config: Any
    mm_vision_tower: str = ""
    mm_projector_type: str = "ldpnet"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    image_aspect_ratio: str = "pad"
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, d: dict, **overrides):
        text = llama.Config.from_dict({**d, "model_type": "llama"})
        vision = clip.Config.from_dict(vision_config_dict(d))
        cfg = base.from_dict(cls, d, text_config=text, vision_config=vision,
                             tie_word_embeddings=text.tie_word_embeddings, **overrides)
        if cfg.mm_vision_select_feature not in ("patch", "cls_patch"):
            raise ConfigError(f"unknown mm_vision_select_feature {cfg.mm_vision_select_feature!r}; "
                              "use 'patch' or 'cls_patch'")
        return cfg

    # the names llava.Model's feature code reads
    @property
    def feature_layers(self) -> tuple[int, ...]:
        return (self.mm_vision_select_layer,)

    @property
    def vision_feature_select_strategy(self) -> str:
        return "default" if self.mm_vision_select_feature == "patch" else "full"

    @property
    def image_token_index(self) -> int:
        return IMAGE_TOKEN_INDEX

    @property
    def max_position_embeddings(self) -> int:
        return self.text_config.max_position_embeddings


class Model(llava.Model):
    """MobileVLM for generation: the LLaVA contract (``encode_images``, ``embed``, ``num_image_tokens``) over
    MobileVLM's parameter names."""

    def __init__(self, cfg: Config, max_seq_len: int | None = None):
        nn.Module.__init__(self)
        self.config = cfg
        text = llama.Model(cfg.text_config, max_seq_len=max_seq_len)
        object.__setattr__(self, "_text", text)
        self.model = text.model  # model.embed_tokens / layers / norm, as in the checkpoint
        self.model.vision_tower = nn.Module()  # MobileVLM's CLIPVisionTower wrapper: only a level of names
        self.model.vision_tower.vision_tower = clip.Model(cfg.vision_config)
        self.model.mm_projector = build_projector(cfg.mm_projector_type, cfg.vision_config.hidden_size,
                                                  cfg.text_config.hidden_size)
        self.lm_head = text.lm_head

    def _sync_text(self):
        if self._text.lm_head is not self.lm_head:
            self._text.lm_head = self.lm_head

    def image_hidden_states(self, pixel_values):
        h = self.model.vision_tower.vision_tower(pixel_values, self.config.mm_vision_select_layer)
        return clip.select_features(h, self.config.vision_feature_select_strategy)

    def encode_images(self, pixel_values, image_sizes=None):
        """Pixel values ``[n_images, 3, H, W]`` -> projected features ``[n_images, n_tokens, text_hidden]``."""
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        p = next(self.model.mm_projector.parameters())
        return self.model.mm_projector(self.image_hidden_states(pixel_values.to(p.device, p.dtype)))

    def num_image_tokens(self, image_size=None) -> int:
        n = self.model.vision_tower.vision_tower.num_features(self.config.vision_feature_select_strategy)
        kind = PROJECTOR_ALIASES.get(self.config.mm_projector_type, self.config.mm_projector_type)
        if kind == "ldp":  # a stride-2 conv halves the grid, rounding up
            return math.ceil(math.isqrt(n) / 2) ** 2
        if kind == "ldpv2":
            return self.model.mm_projector.out_grid ** 2
        return n

    def default_image_processor(self):
        """MobileVLM folders ship no preprocessor_config.json: CLIP processing of the tower's size."""
        from ..image import ImageProcessorConfig

        size = self.config.vision_config.image_size
        if self.config.image_aspect_ratio == "pad":
            return ImageProcessorConfig.llava(size)
        return ImageProcessorConfig.clip(size)


TOWER = "model.vision_tower.vision_tower."


def sanitize(weights: dict, cfg: Config) -> dict:
    vision, text, out = {}, {}, {}
    for k, v in weights.items():
        if k.startswith(TOWER):
            vision[k[len(TOWER):]] = v
        elif k.startswith("model.mm_projector."):
            out[k] = v
        else:
            text[k] = v
    out.update(llama.sanitize(text, cfg.text_config))
    out.update({TOWER + k: v for k, v in clip.sanitize(vision, cfg.vision_config).items()})
    return out
