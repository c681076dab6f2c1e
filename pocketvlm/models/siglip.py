"""SigLIP vision transformer (the vision tower of LLaVA-OneVision and many small VLMs).

Differences from CLIP (whose encoder layers this file reuses):
- no class token: the position embeddings cover the patches only, and the patch ``Conv2d`` has a bias;
- no pre-encoder LayerNorm; ``post_layernorm`` is applied to every token of the last layer
  (HF's ``last_hidden_state``), but the hidden states a VLM selects are the raw layer outputs;
- ``hidden_act`` is ``gelu_pytorch_tanh`` (the tanh approximation of GELU), LayerNorm eps 1e-6;
- VLMs take the last layer (``vision_feature_layer=-1``) with all tokens (``"full"``);
- used alone, the pooled output comes from an attention-pooling head (``head.*``, present when
  ``vision_use_head``): a learned ``probe`` query attends over the post-normed tokens through a
  ``nn.MultiheadAttention``-style block (packed ``in_proj_weight``/``in_proj_bias``, ``out_proj``), then a
  pre-norm MLP residual (``layernorm``, ``mlp``).

Position embeddings can be interpolated (bicubic) to other resolutions, as HF's ``interpolate_pos_encoding``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import clip
from .clip import Encoder, MLP, check_size, interpolate_positions, select_features

__all__ = ["Config", "Model", "sanitize", "select_features"]


@dataclass(frozen=True)
class Config(clip.Config):
    model_type: str = "siglip_vision_model"
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True


class Embeddings(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values, interpolate_pos_encoding: bool = False):
        cfg = self.config
        check_size(pixel_values, cfg.image_size, interpolate_pos_encoding)
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.dtype)).flatten(2).transpose(1, 2)  # [B, N, D]
        pos = self.position_embedding.weight
        gh, gw = (s // cfg.patch_size for s in pixel_values.shape[-2:])
        if (gh, gw) != (cfg.grid, cfg.grid):
            pos = interpolate_positions(pos, gh, gw)
        # contiguous: x is a transposed view, and x + pos would keep its strides, so every later residual add,
        # LayerNorm and matmul input of the encoder would run on (or first copy) a transposed layout
        return (x + pos).contiguous()


class PoolingAttention(nn.Module):
    """One query per image over all tokens; parameters named as ``nn.MultiheadAttention``'s."""

    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d))
        self.out_proj = nn.Linear(d, d)

    def forward(self, query, x):
        B, S, d = x.shape
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        heads = lambda t: t.view(B, t.shape[1], self.n_heads, -1).transpose(1, 2)  # noqa: E731  [B, H, S, D]
        q = heads(F.linear(query, wq, bq))
        k, v = heads(F.linear(x, wk, bk)), heads(F.linear(x, wv, bv))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(o.transpose(1, 2).reshape(B, -1, d))


class PoolingHead(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        self.attention = PoolingAttention(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        h = self.attention(self.probe.expand(x.shape[0], -1, -1), x)  # [B, 1, D]
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class VisionTransformer(nn.Module):
    """``vision_model.*``: embeddings, encoder, ``post_layernorm``, optional ``head``."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.vision_use_head:
            self.head = PoolingHead(cfg)

    def embed(self, pixel_values, interpolate_pos_encoding=False):
        return self.embeddings(pixel_values, interpolate_pos_encoding)  # no pre-layernorm in SigLIP

    # the same layer walk as CLIP's; only ``embed`` differs
    hidden_states = clip.VisionTransformer.hidden_states

    def pool(self, last_hidden):
        if not self.config.vision_use_head:
            raise clip.ConfigError("this SigLIP encoder has no pooling head (vision_use_head is false)")
        return self.head(self.post_layernorm(last_hidden))


class Model(clip.Model):
    """A SigLIP vision encoder on its own. ``forward`` returns the hidden states of ``output_layer`` (default last)."""

    transformer_cls = VisionTransformer
    has_class_token = False

    def forward(self, pixel_values, output_layer: int = -1, interpolate_pos_encoding: bool = False):
        return super().forward(pixel_values, output_layer, interpolate_pos_encoding)

    def last_hidden_state(self, pixel_values, interpolate_pos_encoding: bool = False):
        """HF's ``last_hidden_state``: the last layer after ``post_layernorm``."""
        return self.vision_model.post_layernorm(self(pixel_values, -1, interpolate_pos_encoding))

    def features(self, pixel_values, layer: int = -1, strategy: str = "full"):
        return select_features(self(pixel_values, layer), strategy)

    def num_features(self, strategy: str = "full") -> int:
        return super().num_features(strategy)


sanitize = clip.sanitize
