"""LLaVA (LLaVA-1.5 and the llava-hf checkpoints): vision tower + MLP projector + any registered decoder.

Architecture, as Hugging Face's ``LlavaForConditionalGeneration``:
- ``model.vision_tower``: CLIP, SigLIP or DINOv2, chosen by ``vision_config.model_type``;
- the hidden states of ``vision_feature_layer`` (an int, or a list whose states are concatenated on the
  feature axis; LLaVA-1.5 uses -2, the penultimate layer), with the first token dropped when
  ``vision_feature_select_strategy == "default"`` (CLIP's and DINOv2's class token; DINOv2's final
  ``layernorm`` is not applied, as HF takes ``hidden_states[vision_feature_layer]``);
- ``model.multi_modal_projector``: ``linear_1`` -> ``projector_hidden_act`` -> ``linear_2``;
- ``model.language_model`` + ``lm_head``: the decoder of ``text_config.model_type`` (llama, qwen2, ...);
- the prompt holds one ``image_token_index`` token per feature row (the processor expands ``<image>``);
  the features replace those tokens' embeddings in order, as HF's ``masked_scatter``.

Checkpoint layouts accepted by ``sanitize``: transformers 4.x / llava-hf hub files (``vision_tower.*``,
``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.*``; transformers 5 still
saves this layout, without the vision tower's ``vision_model.`` level) and transformers 5's module names
(``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.*``).

The decoder is the text family's own ``Model`` (so family quirks such as final-logit soft-capping stay
in that family); its ``model`` and ``lm_head`` modules are registered here under HF's names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ImageError
from . import base, registry
from .projectors import build_projector

VISION_FAMILIES = ("clip_vision_model", "siglip_vision_model", "dinov2")


def text_family(cfg):
    return registry.family(cfg.model_type)


def vision_family(model_type: str):
    if model_type not in VISION_FAMILIES:
        raise ConfigError(f"unsupported vision tower {model_type!r}; supported: {', '.join(VISION_FAMILIES)}")
    return registry.family(model_type)


def sub_configs(d: dict) -> tuple[Any, Any, bool]:
    """(text config, vision config, tie_word_embeddings) from a VLM config.json dict."""
    for key in ("text_config", "vision_config"):
        if not isinstance(d.get(key), dict) or "model_type" not in d[key]:
            raise ConfigError(f"config for {d.get('model_type')!r} lacks {key} (with its model_type)")
    tc = d["text_config"]
    # HF forwards a text-level tie_word_embeddings to the top level (older configs kept it there).
    tie = bool(d.get("tie_word_embeddings") or tc.get("tie_word_embeddings"))
    text = registry.family(tc["model_type"]).Config.from_dict({**tc, "tie_word_embeddings": tie})
    vision = vision_family(d["vision_config"]["model_type"]).Config.from_dict(d["vision_config"])
    return text, vision, tie


@dataclass(frozen=True)
class Config:
    model_type: str
    text_config: Any
    vision_config: Any
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int | tuple = -2
    vision_feature_select_strategy: str = "default"
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, d: dict, **overrides):
        text, vision, tie = sub_configs(d)
        extra = {}
        if "image_token_index" not in d and "image_token_id" in d:  # the transformers-5 spelling
            extra["image_token_index"] = d["image_token_id"]
        cfg = base.from_dict(cls, {**d, **extra}, text_config=text, vision_config=vision,
                             tie_word_embeddings=tie, **overrides)
        if cfg.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(f"unknown vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}; "
                              "use 'default' or 'full'")
        return cfg

    @property
    def feature_layers(self) -> tuple[int, ...]:
        f = self.vision_feature_layer
        return tuple(f) if isinstance(f, (tuple, list)) else (f,)

    @property
    def max_position_embeddings(self) -> int:
        return self.text_config.max_position_embeddings


class Model(nn.Module):
    """LLaVA for generation. Keeps the text-model contract (``forward``, ``make_cache``,
    ``get_input_embeddings``, ``tie_weights``) and adds ``encode_images``, ``embed``, ``num_image_tokens``."""

    def __init__(self, cfg: Config, max_seq_len: int | None = None):
        super().__init__()
        self.config = cfg
        text = text_family(cfg.text_config).Model(cfg.text_config, max_seq_len=max_seq_len)
        # Not registered as a child: its modules are, below, under HF's names.
        object.__setattr__(self, "_text", text)
        self.model = nn.Module()
        # The decoder first: callers read the model's dtype from its first parameter (the KV cache's dtype
        # among others), and the vision tower may run in another one (vision_precision "bf16").
        self.model.language_model = text.model
        self.model.vision_tower = vision_family(cfg.vision_config.model_type).Model(cfg.vision_config)
        self.model.multi_modal_projector = build_projector(
            "mlp2x_gelu", cfg.vision_config.hidden_size * len(cfg.feature_layers), cfg.text_config.hidden_size,
            hidden_act=cfg.projector_hidden_act, bias=cfg.multimodal_projector_bias)
        self.lm_head = text.lm_head

    # --- text-model contract -------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.config.image_token_index

    def tie_weights(self):
        self._text.tie_weights()
        self.lm_head = self._text.lm_head

    def get_input_embeddings(self) -> nn.Module:
        return self._text.get_input_embeddings()

    def make_cache(self, batch: int, max_len: int, dtype=None, device=None):
        return self._text.make_cache(batch, max_len, dtype, device)

    def forward(self, input_ids=None, *, inputs_embeds=None, input_pos=None, cache=None, attention_mask=None,
                position_ids=None, logits_to_keep: int = 0, pixel_values=None, image_sizes=None):
        """Logits ``[B, S, V]``. With ``pixel_values`` the images are encoded and spliced into ``input_ids``'s
        image-token positions (a convenience; the engine calls ``encode_images``/``embed`` itself)."""
        if pixel_values is not None:
            if inputs_embeds is not None:
                raise ValueError("pass pixel_values with input_ids, not with inputs_embeds")
            inputs_embeds = self.embed(input_ids, self.encode_images(pixel_values, image_sizes=image_sizes))
            input_ids = None
        elif input_ids is not None and inputs_embeds is None and bool((input_ids == self.image_token_id).any()):
            raise ImageError("input_ids contain image tokens but no pixel_values were given")
        self._sync_text()
        return self._text(input_ids, inputs_embeds=inputs_embeds, input_pos=input_pos, cache=cache,
                          attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=logits_to_keep)

    def _sync_text(self):
        # A layer swap (quantization) replaces ``lm_head`` / ``model.language_model`` on this module; the
        # decoder object that runs them must see the new ones.
        if self._text.lm_head is not self.lm_head:
            self._text.lm_head = self.lm_head
        if self._text.model is not self.model.language_model:
            self._text.model = self.model.language_model

    # --- images --------------------------------------------------------------------------------------
    def image_hidden_states(self, pixel_values) -> torch.Tensor:
        """Selected vision features before the projector ``[n, tokens, vision_hidden * n_layers]``."""
        from .clip import select_features

        states = self.model.vision_tower.hidden_states(pixel_values, self.config.feature_layers)
        states = [select_features(h, self.config.vision_feature_select_strategy) for h in states]
        return torch.cat(states, dim=-1) if len(states) > 1 else states[0]

    def encode_images(self, pixel_values, image_sizes=None) -> torch.Tensor:
        """Pixel values ``[n_images, 3, H, W]`` -> projected features ``[n_images, n_tokens, text_hidden]``.
        ``image_sizes`` is accepted for a uniform VLM interface; LLaVA-1.5 images are all one size."""
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        p = self.model.multi_modal_projector.linear_1.weight
        return self.model.multi_modal_projector(self.image_hidden_states(pixel_values.to(p.device, p.dtype)))

    def num_image_tokens(self, image_size=None) -> int:
        """Image tokens one ``<image>`` expands to (every image is resized to the tower's size)."""
        return self.model.vision_tower.num_features(self.config.vision_feature_select_strategy)

    def embed(self, input_ids: torch.Tensor, image_features) -> torch.Tensor:
        """Token embeddings of ``input_ids`` ``[B, S]`` with the image-token rows replaced, in order, by the rows
        of ``image_features`` (``[n_images, n_tokens, D]``, or a list of ``[n_tokens_i, D]``)."""
        if isinstance(image_features, (list, tuple)):
            image_features = torch.cat([f.reshape(-1, f.shape[-1]) for f in image_features])
        feats = image_features.reshape(-1, image_features.shape[-1])
        mask = input_ids == self.image_token_id
        n = int(mask.sum())
        if n != feats.shape[0]:
            raise ImageError(f"the prompt has {n} image tokens but the images give {feats.shape[0]} feature rows; "
                             "expand each image placeholder to num_image_tokens(image_size) tokens")
        # The image token id may lie outside the vocabulary (MobileVLM uses -200): embed a valid id there.
        e = self.get_input_embeddings()(input_ids.masked_fill(mask, 0))
        return e.masked_scatter(mask[..., None], feats.to(e.device, e.dtype))


# --- checkpoint names --------------------------------------------------------------------------------

# (checkpoint prefix, module prefix), first match wins.
_PREFIXES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("language_model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
)


def rename(key: str) -> str:
    if key.startswith(("model.", "lm_head.")):
        return key
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def split_and_sanitize(weights: dict, cfg, tower_prefix="model.vision_tower.", text_prefix="model.language_model."):
    """Apply the text and vision families' ``sanitize`` to their parts of an already renamed state dict."""
    text_w, vision_w, rest = {}, {}, {}
    for k, v in weights.items():
        if k.startswith(text_prefix):
            text_w["model." + k[len(text_prefix):]] = v
        elif k.startswith("lm_head."):
            text_w[k] = v
        elif k.startswith(tower_prefix):
            vision_w[k[len(tower_prefix):]] = v
        else:
            rest[k] = v
    for k, v in text_family(cfg.text_config).sanitize(text_w, cfg.text_config).items():
        rest[text_prefix + k[len("model."):] if k.startswith("model.") else k] = v
    for k, v in vision_family(cfg.vision_config.model_type).sanitize(vision_w, cfg.vision_config).items():
        rest[tower_prefix + k] = v
    return rest


def sanitize(weights: dict, cfg: Config) -> dict:
    return split_and_sanitize({rename(k): v for k, v in weights.items()}, cfg)
