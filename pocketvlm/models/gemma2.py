"""Gemma 2 decoder (Gemma 2 2B/9B/27B). Everything of Gemma (``1 + weight`` norms, scaled embeddings,
GeGLU, tied head) plus, as in Hugging Face's ``Gemma2ForCausalLM``:

- "sandwich" norms: the attention output goes through ``post_attention_layernorm`` before the residual add,
  and the MLP is wrapped by ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm``;
- attention scores scaled by ``query_pre_attn_scalar ** -0.5`` (not head_dim) and soft-capped with
  ``tanh(s / cap) * cap`` (``attn_logit_softcapping``) before the mask;
- final logits soft-capped the same way (``final_logit_softcapping``);
- sliding-window and global layers alternating (``layer_types``; by default even layers slide).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import base, gemma, llama
from .layers import apply_rope


@dataclass(frozen=True)
class Config(gemma.Config):
    query_pre_attn_scalar: float = 256
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    sliding_window: int | None = 4096

    @classmethod
    def from_dict(cls, d: dict, **overrides):
        # Gemma 2 and 3 name the activation ``hidden_activation`` (``hidden_act`` is not read by HF).
        overrides.setdefault("hidden_act", d.get("hidden_activation") or "gelu_pytorch_tanh")
        return base.from_dict(cls, d, rope=base.rope_parameters(d), **overrides)

    def layer_type(self, i: int) -> str:
        if self.layer_types:
            return self.layer_types[i]
        return "sliding_attention" if (i + 1) % 2 else "full_attention"


def softcapped_attention(q, k, v, mask, scale: float, cap: float):
    """Attention with ``tanh(s / cap) * cap`` on the scores (no fused kernel does this).

    q [B,H,S,D], k/v [B,Hkv,T,D], mask bool [B or 1,1,S,T]. Masked scores get the dtype's lowest value,
    not -inf: a query row with no visible key (right padding under a sliding window) then stays finite
    instead of turning into NaN that ``0 * NaN`` would carry into the valid rows of the next layer.
    """
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = torch.tanh((q @ k.transpose(-1, -2)) * scale / cap) * cap
    s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class Attention(llama.Attention):
    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.scale = cfg.query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_logit_softcapping

    def forward(self, x, cos, sin, mask, cache=None, input_pos=None):
        if self.softcap is None:
            return super().forward(x, cos, sin, mask, cache, input_pos)
        B, S, _ = x.shape
        q, k, v = self.project_qkv(x)  # [B, H, S, D]
        q, k = apply_rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, input_pos, k, v)
        o = softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))


class DecoderLayer(gemma.DecoderLayer):
    attention_cls = Attention

    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.pre_feedforward_layernorm = self.norm_cls(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = self.norm_cls(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, input_pos=None):
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, input_pos)
        x = x + self.post_attention_layernorm(a)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))

    def parts(self) -> dict:
        return {**super().parts(), "attn_out_norm": self.post_attention_layernorm,
                "ffn_in_norm": self.pre_feedforward_layernorm, "ffn_out_norm": self.post_feedforward_layernorm}


class TextModel(gemma.TextModel):
    layer_cls = DecoderLayer


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


class Model(gemma.Model):
    text_model_cls = TextModel

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return softcap(logits, self.config.final_logit_softcapping)


sanitize = gemma.sanitize

# --- llama.cpp GGUF ---------------------------------------------------------------------------------

# llama.cpp calls Gemma 2's pre-MLP norm ``ffn_norm`` (the slot Llama's post-attention norm uses).
GGUF_TENSORS = {
    **gemma.GGUF_TENSORS,
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}

# llama.cpp's model types whose attention scale is 1/sqrt(hidden / heads) rather than 1/sqrt(head_dim);
# GGUF files do not store query_pre_attn_scalar, so llama.cpp decides by model size (block count) and so do we.
_SCALE_BY_HIDDEN_BLOCKS = {"gemma2": 46, "gemma3": 62}  # the 27B models


def gguf_config(meta: dict, arch: str) -> dict:
    """Gemma 2/3 settings from GGUF metadata (soft-capping, sliding window, attention scale)."""
    g = lambda k, default=None: meta.get(f"{arch}.{k}", default)  # noqa: E731
    d = llama.gguf_config(meta, arch)
    d["model_type"] = "gemma2"
    d["hidden_activation"] = "gelu_pytorch_tanh"
    d.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
    if d["num_hidden_layers"] == _SCALE_BY_HIDDEN_BLOCKS.get(arch):
        d["query_pre_attn_scalar"] = d["hidden_size"] // d["num_attention_heads"]
    else:
        d["query_pre_attn_scalar"] = d["head_dim"]
    # llama.cpp's defaults when the keys are absent: Gemma 2 caps (50, 30), Gemma 3 does not.
    d["attn_logit_softcapping"] = g("attn_logit_softcapping", 50.0 if arch == "gemma2" else None)
    d["final_logit_softcapping"] = g("final_logit_softcapping", 30.0 if arch == "gemma2" else None)
    pattern = g("attention.sliding_window_pattern")
    if isinstance(pattern, (list, tuple, np.ndarray)) and len(pattern) == d["num_hidden_layers"]:
        # one flag per layer (newer llama.cpp files, pocketvlm's export): True = sliding-window layer
        d["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    return d


def gguf_sanitize(weights: dict, cfg: Config) -> dict:
    return sanitize(gemma.unfold_norms(weights), cfg)
