"""Phi-3 decoder (Phi-3-mini 4k/128k, Phi-3.5-mini). A Llama with, as in Hugging Face's ``Phi3ForCausalLM``:

- fused projections, HF names kept: ``qkv_proj`` (rows: q, then k, then v) and ``gate_up_proj``
  (rows: gate, then up; ``down_proj(silu(gate) * up)``); no biases;
- RoPE possibly ``longrope`` (the 128k models; old configs call it "su" or "yarn"). HF picks the short or long
  factors by the current sequence length at every call; we fix the choice when the model is built, from
  ``max_seq_len`` (long factors only when it exceeds ``original_max_position_embeddings``), so cached keys
  never mix the two. ``partial_rotary_factor`` rotates only the first part of each head;
- when ``sliding_window`` is set, every layer uses it (HF builds a single sliding-window mask for all layers).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import UnsupportedArchitectureError
from . import base, llama


def rope_parameters(d: dict) -> dict:
    """Phi-3's RoPE dict: ``rope_scaling`` wins over ``rope_parameters``; the top-level
    ``original_max_position_embeddings`` and ``partial_rotary_factor`` are folded in, as HF does."""
    p = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    p.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    p.setdefault("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    kind = p.pop("type", None)
    kind = p.get("rope_type", kind) or "default"
    p["rope_type"] = "longrope" if kind in ("su", "yarn") else kind
    if p["rope_type"] in ("llama3", "yarn", "longrope"):
        if d.get("original_max_position_embeddings") is not None:
            p["original_max_position_embeddings"] = d["original_max_position_embeddings"]
        else:
            p.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 4096))
    return p


@dataclass(frozen=True)
class Config(llama.Config):
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096

    @classmethod
    def from_dict(cls, d: dict, **overrides):
        return base.from_dict(cls, d, rope=rope_parameters(d), **overrides)


class Attention(llama.Attention):
    def __init__(self, cfg: Config, layer_idx: int):
        nn.Module.__init__(self)  # replaces Llama's separate q/k/v projections with the fused one
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.n_kv_heads, cfg.dim_head
        rows = (self.n_heads + 2 * self.n_kv) * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, rows, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.scale = self.head_dim ** -0.5
        self.softcap = None

    def project_qkv(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv_proj(x).split(
            [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], dim=-1)
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        return q, k, v  # [B, H, S, D]

    def projections(self) -> list:
        return [self.qkv_proj]


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act_name = cfg.hidden_act
        self.act = llama.ACT[cfg.hidden_act]

    def projections(self) -> list:
        return [self.gate_up_proj]

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(llama.DecoderLayer):
    attention_cls = Attention
    mlp_cls = MLP


class TextModel(llama.TextModel):
    layer_cls = DecoderLayer


class Model(llama.Model):
    text_model_cls = TextModel


sanitize = llama.sanitize

# --- llama.cpp GGUF ---------------------------------------------------------------------------------

GGUF_TENSORS = {
    # embeddings, norms, output head and o_proj/down_proj as in llama; q/k/v and gate/up are fused
    **{k: v for k, v in llama.GGUF_TENSORS.items()
       if not any(p in k for p in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"))},
    "blk.{i}.attn_qkv.weight": "model.layers.{i}.self_attn.qkv_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.gate_up_proj.weight",  # fused gate+up, as in HF
    # the 128k models carry their LongRoPE factors as tensors; see gguf_sanitize
    "rope_factors_long.weight": "rope_factors_long.weight",
    "rope_factors_short.weight": "rope_factors_short.weight",
}


def gguf_config(meta: dict, arch: str) -> dict:
    g = lambda k, default=None: meta.get(f"{arch}.{k}", default)  # noqa: E731
    d = llama.gguf_config(meta, arch)
    d["model_type"] = "phi3"
    d["hidden_act"] = "silu"
    d["rms_norm_eps"] = g("attention.layer_norm_rms_epsilon", 1e-5)
    head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    rot = g("rope.dimension_count")
    if rot and rot != head_dim:
        d["partial_rotary_factor"] = rot / head_dim
    if g("rope.scaling.original_context_length"):
        d["original_max_position_embeddings"] = g("rope.scaling.original_context_length")
    return d


def gguf_sanitize(weights: dict, cfg: Config) -> dict:
    if "rope_factors_long.weight" in weights or "rope_factors_short.weight" in weights:
        # The factors are needed to build the model, but GGUF hands them over as tensors after the config
        # is fixed; until the loader passes them to gguf_config, refuse rather than run without them.
        raise UnsupportedArchitectureError(
            "Phi-3 GGUF files with LongRoPE factors (the 128k-context models) are not supported yet; "
            "use the 4k-context model or the Hugging Face folder")
    return sanitize(weights, cfg)  # llama.cpp's Phi-3 converter does not permute q/k
