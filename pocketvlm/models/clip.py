"""CLIP vision transformer (OpenAI CLIP ViT; the vision tower of LLaVA-1.5 and MobileVLM).

Architecture choices, as in Hugging Face's ``CLIPVisionModel``:
- patch embedding is a bias-free ``Conv2d(patch, stride=patch)``; a learned class token is prepended and
  learned absolute position embeddings (``num_patches + 1``) are added;
- a LayerNorm *before* the encoder, spelled ``pre_layrnorm`` in every checkpoint (sic);
- pre-norm encoder layers (``layer_norm1`` -> attention -> residual, ``layer_norm2`` -> MLP -> residual),
  q/k/v/out projections with biases, MLP ``fc1`` -> act -> ``fc2``;
- ``hidden_act`` is ``quick_gelu`` (``x * sigmoid(1.702 x)``) in OpenAI's checkpoints;
- ``post_layernorm`` is applied to the pooled class token only, never to the token features a VLM uses.

Hidden-state indexing follows HF's ``output_hidden_states``: index 0 is the embeddings after
``pre_layrnorm``, index i the output of layer i, so ``-1`` is the last layer and ``-2`` (LLaVA's
``vision_feature_layer``) the penultimate. Only the layers up to the one asked for are run.
Feature selection: ``"default"`` drops the class token, ``"full"`` keeps it.

Parameter names are HF's under ``vision_model.`` (the layout of CLIP checkpoints on the hub and of
LLaVA's ``vision_tower.vision_model.*``); transformers 5 saves a bare ``CLIPVisionModel`` without that
prefix, which ``sanitize`` puts back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ImageError
from . import base

ACT = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class Config:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    model_type: str = "clip_vision_model"
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: dict, **overrides):
        cfg = base.from_dict(cls, d, **overrides)
        if cfg.hidden_act not in ACT:
            raise ConfigError(f"unsupported vision hidden_act {cfg.hidden_act!r}; supported: {', '.join(ACT)}")
        return cfg

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2


# --- shared by the ViT families (SigLIP reuses these by import) --------------------------------------

def layer_index(i: int, n_layers: int) -> int:
    """HF hidden-state index (negative counts from the end of L+1 states) -> 0..L."""
    j = i if i >= 0 else n_layers + 1 + i
    if not 0 <= j <= n_layers:
        raise ConfigError(f"vision feature layer {i} is out of range for a {n_layers}-layer encoder")
    return j


def run_blocks(blocks, h: torch.Tensor, start: int, layers) -> list[torch.Tensor]:
    """The hidden states at HF indices ``layers`` (all ``>= start``) from ``h``, the state at index ``start``
    (0: the encoder's input), running ``blocks`` no further than the last one needed."""
    want = [layer_index(i, len(blocks)) for i in layers]
    if min(want) < start:
        raise ValueError(f"hidden state {min(want)} comes before the start state {start}")
    states = {start: h}
    for i, block in enumerate(blocks[start:max(want)], start=start + 1):
        h = block(h)
        states[i] = h
    return [states[j] for j in want]


def interpolate_positions(pos: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Square grid of position embeddings ``[N, D]`` -> ``[height*width, D]``, bicubic as HF does."""
    n, dim = pos.shape
    side = math.isqrt(n)
    grid = pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(height * width, dim)


def check_size(pixel_values: torch.Tensor, image_size: int, interpolate: bool):
    if pixel_values.dim() != 4:
        raise ImageError(
            f"pixel_values must be [batch, channels, height, width], got shape {tuple(pixel_values.shape)}")
    h, w = pixel_values.shape[-2:]
    if not interpolate and (h, w) != (image_size, image_size):
        raise ImageError(
            f"pixel_values are {h}x{w} but this vision encoder takes {image_size}x{image_size}; preprocess with the "
            "model's image processor, or pass interpolate_pos_encoding=True")


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.head_dim = d // self.n_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = (p(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # [B, H, S, D]
        o = F.scaled_dot_product_attention(q, k, v)  # bidirectional: no mask
        return self.out_proj(o.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACT[cfg.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


# --- CLIP ---------------------------------------------------------------------------------------------

class Embeddings(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixel_values, interpolate_pos_encoding: bool = False):
        cfg = self.config
        check_size(pixel_values, cfg.image_size, interpolate_pos_encoding)
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.dtype)).flatten(2).transpose(1, 2)  # [B, N, D]
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        pos = self.position_embedding.weight
        gh, gw = (s // cfg.patch_size for s in pixel_values.shape[-2:])
        if (gh, gw) != (cfg.grid, cfg.grid):  # the class token's position is kept as is
            pos = torch.cat([pos[:1], interpolate_positions(pos[1:], gh, gw)])
        return x + pos


class VisionTransformer(nn.Module):
    """``vision_model.*``: embeddings, ``pre_layrnorm``, encoder, ``post_layernorm``."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def embed(self, pixel_values, interpolate_pos_encoding=False):
        return self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))

    def hidden_states(self, pixel_values, layers, interpolate_pos_encoding=False) -> list[torch.Tensor]:
        """HF hidden states at indices ``layers`` (each ``[B, tokens, D]``), running no layer past the last needed."""
        return run_blocks(self.encoder.layers, self.embed(pixel_values, interpolate_pos_encoding), 0, layers)

    def pool(self, last_hidden):
        return self.post_layernorm(last_hidden[:, 0])


def select_features(h: torch.Tensor, strategy: str) -> torch.Tensor:
    """LLaVA's ``vision_feature_select_strategy``: ``"default"`` drops the first token, ``"full"`` keeps all."""
    if strategy == "default":
        return h[:, 1:]
    if strategy == "full":
        return h
    raise ConfigError(f"unknown vision_feature_select_strategy {strategy!r}; use 'default' or 'full'")


class Model(nn.Module):
    """A CLIP vision encoder on its own. ``forward`` returns the hidden states of ``output_layer``."""

    transformer_cls = VisionTransformer
    has_class_token = True
    #: what LoRA on the tower's blocks targets by default, and where the blocks are (``pocketvlm.train.tower``)
    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    blocks_path = "vision_model.encoder.layers"

    def __init__(self, cfg: Config, max_seq_len: int | None = None):
        super().__init__()
        self.config = cfg
        self.vision_model = self.transformer_cls(cfg)

    def forward(self, pixel_values, output_layer: int = -2, interpolate_pos_encoding: bool = False):
        return self.vision_model.hidden_states(pixel_values, [output_layer], interpolate_pos_encoding)[0]

    def hidden_states(self, pixel_values, layers, interpolate_pos_encoding: bool = False):
        return self.vision_model.hidden_states(pixel_values, layers, interpolate_pos_encoding)

    def continue_states(self, h, start: int, layers) -> list[torch.Tensor]:
        """The hidden states at ``layers`` from ``h``, the state at index ``start`` (see ``run_blocks``)."""
        return run_blocks(self.vision_model.encoder.layers, h, start, layers)

    def pooled(self, pixel_values, interpolate_pos_encoding: bool = False):
        """HF's ``pooler_output``: ``post_layernorm`` of the last layer's class token ``[B, D]``."""
        return self.vision_model.pool(self(pixel_values, -1, interpolate_pos_encoding))

    def features(self, pixel_values, layer: int = -2, strategy: str = "default"):
        return select_features(self(pixel_values, layer), strategy)

    def num_features(self, strategy: str = "default") -> int:
        """Token rows per image after ``select_features`` at the native resolution."""
        n = self.config.num_patches + int(self.has_class_token)
        return n - 1 if strategy == "default" else n


def sanitize(weights: dict, cfg: Config) -> dict:
    """Bare-encoder checkpoint -> ``vision_model.*`` keys; drops the non-persistent ``position_ids`` buffer."""
    out = {}
    for k, v in weights.items():
        if k.endswith("position_ids"):
            continue
        out[k if k.startswith("vision_model.") else "vision_model." + k] = v
    return out
