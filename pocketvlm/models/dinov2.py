"""DINOv2 vision transformer (Meta's self-supervised ViT; a vision tower for LLaVA-style VLMs).

Architecture choices, as in Hugging Face's ``Dinov2Model``:
- patch embedding is a ``Conv2d(patch, stride=patch)`` *with* a bias; a learned class token ``cls_token``
  ``[1, 1, D]`` is prepended and learned absolute position embeddings ``[1, N + 1, D]`` are added;
- no LayerNorm before the encoder; pre-norm layers (``norm1`` -> attention, ``norm2`` -> MLP), each branch
  multiplied by a learned per-channel **layer scale** (``layer_scale1`` / ``layer_scale2``, ``lambda1``)
  before its residual add;
- q/k/v/out projections with biases under HF's nested names (``attention.attention.query`` ...,
  ``attention.output.dense``); MLP ``fc1`` -> act -> ``fc2`` with ``intermediate = hidden * mlp_ratio``;
- ``hidden_act`` is ``gelu``: the exact (erf) GELU; LayerNorm eps 1e-6;
- the final ``layernorm`` is applied to every token of the last layer (HF's ``last_hidden_state``; the
  pooled output is its class token), never to the hidden states a VLM selects: LLaVA with
  ``vision_feature_layer=-1`` takes ``hidden_states[-1]``, the raw last layer;
- the position embeddings are resampled (bicubic, in float32, the class token's kept) for every input
  whose patch grid differs from the config's ``image_size / patch_size`` grid, as HF's
  ``interpolate_pos_encoding`` does unasked, so any multiple-of-``patch_size`` input works. A height or
  width that is not a multiple of the patch is an :class:`ImageError` (HF's convolution would silently drop
  the remainder pixels).
- ``mask_token`` (pre-training only) is kept as a parameter so checkpoints load strictly; it is never used.
- the SwiGLU MLP of the giant checkpoints (``use_swiglu_ffn``) is not supported: a ConfigError.

Hidden-state indexing follows HF's ``output_hidden_states``: index 0 is the embeddings, index i the output
of layer i (before the final ``layernorm``). Feature selection: the class token is kept in the states;
LLaVA's ``"default"`` strategy drops it, ``"full"`` keeps it.

Parameter names are HF's, with no prefix (``embeddings.*``, ``encoder.layer.N.*``, ``layernorm.*``), as
``Dinov2Model.save_pretrained`` writes them; ``sanitize`` also accepts transformers 5's in-memory module
names (``attention.q_proj`` ..., ``attention.o_proj``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, ImageError
from . import base, clip
from .clip import ACT, MLP, check_size, interpolate_positions, run_blocks, select_features

__all__ = ["Config", "Model", "sanitize", "select_features"]


@dataclass(frozen=True)
class Config:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    model_type: str = "dinov2"
    mlp_ratio: float = 4
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0
    qkv_bias: bool = True
    use_swiglu_ffn: bool = False
    use_mask_token: bool = True

    @classmethod
    def from_dict(cls, d: dict, **overrides):
        d = dict(d)
        for key in ("image_size", "patch_size"):  # HF allows [h, w]; only square ones are supported
            v = d.get(key)
            if isinstance(v, (list, tuple)):
                if len(v) != 2 or v[0] != v[1]:
                    raise ConfigError(f"dinov2 {key} {v!r} is not square; only square sizes are supported")
                d[key] = v[0]
        cfg = base.from_dict(cls, d, **overrides)
        if cfg.use_swiglu_ffn:
            raise ConfigError("dinov2 with use_swiglu_ffn=true (the SwiGLU MLP of DINOv2-giant) is not supported")
        if cfg.hidden_act not in ACT:
            raise ConfigError(f"unsupported vision hidden_act {cfg.hidden_act!r}; supported: {', '.join(ACT)}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError(f"hidden_size {cfg.hidden_size} is not a multiple of "
                              f"num_attention_heads {cfg.num_attention_heads}")
        return cfg

    @property
    def intermediate_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)  # HF's rounding (the config has no intermediate_size)

    grid = clip.Config.grid  # image_size // patch_size
    num_patches = clip.Config.num_patches


class PatchEmbeddings(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)

    def forward(self, pixel_values):
        w = self.projection.weight
        return self.projection(pixel_values.to(w.dtype)).flatten(2).transpose(1, 2)  # [B, N, D]


class Embeddings(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        if cfg.use_mask_token:
            self.mask_token = nn.Parameter(torch.empty(1, cfg.hidden_size))
        self.patch_embeddings = PatchEmbeddings(cfg)
        self.position_embeddings = nn.Parameter(torch.empty(1, cfg.num_patches + 1, cfg.hidden_size))

    def forward(self, pixel_values):
        cfg = self.config
        check_size(pixel_values, cfg.image_size, interpolate=True)
        h, w = pixel_values.shape[-2:]
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ImageError(f"pixel_values are {h}x{w}; a DINOv2 encoder needs sides that are multiples of its "
                             f"patch size {cfg.patch_size}")
        x = self.patch_embeddings(pixel_values)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        pos = self.position_embeddings[0]
        gh, gw = h // cfg.patch_size, w // cfg.patch_size
        if (gh, gw) != (cfg.grid, cfg.grid):  # resampled in float32 as HF does: bf16 bicubic drifts
            grid = interpolate_positions(pos[1:].float(), gh, gw).to(pos.dtype)
            pos = torch.cat([pos[:1], grid])
        return (x + pos).contiguous()


class SelfAttention(nn.Module):
    """``attention.attention``: the q/k/v projections."""

    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.hidden_size
        self.query = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.key = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.value = nn.Linear(d, d, bias=cfg.qkv_bias)


class SelfOutput(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)


class Attention(nn.Module):
    """``attention``: bidirectional multi-head attention under HF's nested names."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.n_heads
        self.attention = SelfAttention(cfg)
        self.output = SelfOutput(cfg)

    def forward(self, x):
        B, S, _ = x.shape
        a = self.attention
        q, k, v = (p(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (a.query, a.key, a.value))  # [B, H, S, D]
        o = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.output.dense(o.transpose(1, 2).reshape(B, S, -1))


class LayerScale(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((cfg.hidden_size,), float(cfg.layerscale_value)))

    def forward(self, x):
        return x * self.lambda1


class Layer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.layer_scale1 = LayerScale(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)  # CLIP's fc1 -> act -> fc2, so the vision fast paths swap it as they do CLIP's
        self.layer_scale2 = LayerScale(cfg)

    def forward(self, x):
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))


class Model(nn.Module):
    """A DINOv2 encoder, alone or as a VLM's ``vision_tower``. ``forward`` returns the hidden states of
    ``output_layer`` (default the last layer, before ``layernorm``)."""

    has_class_token = True
    lora_targets = ("query", "key", "value", "dense", "fc1", "fc2")   # see clip.Model
    blocks_path = "encoder.layer"

    def __init__(self, cfg: Config, max_seq_len: int | None = None):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def hidden_states(self, pixel_values, layers, interpolate_pos_encoding: bool = True) -> list[torch.Tensor]:
        """HF hidden states at indices ``layers`` (each ``[B, 1 + patches, D]``), running no layer past the last
        needed. ``interpolate_pos_encoding`` is accepted for the towers' common signature; DINOv2 always
        interpolates, as HF's does."""
        return self.continue_states(self.embeddings(pixel_values), 0, layers)

    def continue_states(self, h, start: int, layers) -> list[torch.Tensor]:
        """The hidden states at indices ``layers`` (all ``>= start``) from ``h``, the hidden state at index
        ``start`` (0: the embeddings' output); what training a tower's last layers runs from cached states."""
        return run_blocks(self.encoder.layer, h, start, layers)

    def forward(self, pixel_values, output_layer: int = -1, interpolate_pos_encoding: bool = True):
        return self.hidden_states(pixel_values, [output_layer])[0]

    def last_hidden_state(self, pixel_values):
        """HF's ``last_hidden_state``: the last layer after the final ``layernorm``."""
        return self.layernorm(self(pixel_values, -1))

    def pooled(self, pixel_values):
        """HF's ``pooler_output``: the class token of ``last_hidden_state`` ``[B, D]``."""
        return self.last_hidden_state(pixel_values)[:, 0]

    def features(self, pixel_values, layer: int = -1, strategy: str = "default"):
        return select_features(self(pixel_values, layer), strategy)

    def num_features(self, strategy: str = "default") -> int:
        """Token rows per image after ``select_features`` at the config's ``image_size``."""
        n = self.config.num_patches + 1
        return n - 1 if strategy == "default" else n


# transformers 5's in-memory module names -> the checkpoint (and pocketvlm) names
_MODULE_NAMES = (
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
)


def sanitize(weights: dict, cfg: Config) -> dict:
    """Strips a ``dinov2.`` prefix (``Dinov2ForImageClassification``'s backbone), maps transformers 5 module
    names to the checkpoint names, drops a classifier head and, when the config has no mask token, the
    ``mask_token``."""
    out = {}
    for k, v in weights.items():
        if k.startswith("dinov2."):
            k = k[len("dinov2."):]
        if k.startswith("classifier.") or (k == "embeddings.mask_token" and not cfg.use_mask_token):
            continue
        for old, new in _MODULE_NAMES:
            k = k.replace(old, new)
        out[k] = v
    return out
