"""Llama decoder (Llama 2/3, TinyLlama, Vicuna, MobileLLaMA; Mistral is the same architecture).

Architecture choices, as in Hugging Face's ``LlamaForCausalLM``:
- pre-norm residual blocks with RMSNorm (``input_layernorm``, ``post_attention_layernorm``), final ``model.norm``;
- grouped-query attention, RoPE in the "rotate half" layout (HF checkpoints are already permuted for it;
  llama.cpp GGUF files are not, see ``unpermute_qk``);
- SwiGLU MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``;
- optional biases (``attention_bias``, ``mlp_bias``), optional tied ``lm_head``;
- sliding-window attention where a layer type says so (Mistral's ``sliding_window``).

This file is also the base the other decoders reuse by subclassing (Qwen2 adds q/k/v biases; the Gemma
family and Phi-3 override what differs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import base
from .layers import RMSNorm, RotaryEmbedding, apply_rope, attention, build_mask, rope_inv_freq

ACT = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
       "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


@dataclass(frozen=True)
class Config:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope: dict = field(default_factory=dict)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    layer_types: tuple | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple | None = None

    @classmethod
    def from_dict(cls, d: dict, **overrides):
        return base.from_dict(cls, d, rope=base.rope_parameters(d), **overrides)

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def layer_type(self, i: int) -> str:
        if self.layer_types:
            return self.layer_types[i]
        return "sliding_attention" if self.sliding_window else "full_attention"


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.n_kv_heads, cfg.dim_head
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=self.qkv_bias(cfg))
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=self.qkv_bias(cfg))
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=self.qkv_bias(cfg))
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = self.head_dim ** -0.5
        self.softcap = None

    @staticmethod
    def qkv_bias(cfg: Config) -> bool:
        return cfg.attention_bias

    def projections(self) -> list:
        """The q/k/v projection layers, in output order (one fused layer in Phi-3)."""
        return [self.q_proj, self.k_proj, self.v_proj]

    def project_qkv(self, x):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x, cos, sin, mask, cache=None, input_pos=None):
        B, S, _ = x.shape
        q, k, v = self.project_qkv(x)  # [B, H, S, D]
        q, k = apply_rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, input_pos, k, v)
        o = attention(q, k, v, mask, self.scale, self.softcap)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act_name = cfg.hidden_act
        self.act = ACT[cfg.hidden_act]

    def projections(self) -> list:
        """The gate and up projection layers, in output order (one fused layer in Phi-3)."""
        return [self.gate_proj, self.up_proj]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    attention_cls = Attention
    mlp_cls = MLP
    norm_cls = RMSNorm

    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__()
        self.layer_type = cfg.layer_type(layer_idx)
        self.self_attn = self.attention_cls(cfg, layer_idx)
        self.mlp = self.mlp_cls(cfg)
        self.input_layernorm = self.norm_cls(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = self.norm_cls(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, input_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))

    def parts(self) -> dict:
        """The layer's pieces in the order ``forward`` runs them, for the fused CPU decode step
        (engine/fused.py): ``x += attn_out_norm(attn(in_norm(x)))``, ``x += ffn_out_norm(mlp(ffn_in_norm(x)))``
        (a ``None`` norm is the identity)."""
        a, m = self.self_attn, self.mlp
        return {"in_norm": self.input_layernorm, "attn_out_norm": None,
                "ffn_in_norm": self.post_attention_layernorm, "ffn_out_norm": None,
                "qkv": a.projections(), "o": [a.o_proj], "gate_up": m.projections(), "down": [m.down_proj],
                "q_norm": getattr(a, "q_norm", None), "k_norm": getattr(a, "k_norm", None)}


class TextModel(nn.Module):
    """``model.*`` of the HF checkpoint: embeddings, layers, final norm. Returns hidden states."""

    layer_cls = DecoderLayer
    norm_cls = RMSNorm

    def __init__(self, cfg: Config, max_seq_len: int | None = None):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.layer_cls(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = self.norm_cls(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = self.make_rotary(cfg, max_seq_len)

    def make_rotary(self, cfg: Config, max_seq_len):
        inv, scale = rope_inv_freq(cfg.rope, cfg.dim_head, cfg.max_position_embeddings, max_seq_len)
        return RotaryEmbedding(inv, scale)

    def scale_embeddings(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def embed_scale(self) -> float:
        """The factor the model applies to ``embed_tokens``' rows for token ids (Gemma: sqrt(hidden))."""
        return 1.0

    def rope(self, positions, dtype, layer_type: str):
        return self.rotary(positions, dtype)

    def masks(self, q_pos, k_pos, key_valid):
        """One boolean mask per layer type. ``key_valid`` is [B, T] (False: padding) or a 4-D [B, 1, S, T]
        boolean mask of allowed pairs (several sequences packed in one row), combined with the causal mask."""
        window = self.config.sliding_window
        types = {layer.layer_type for layer in self.layers}
        pairs = None
        if key_valid is not None and key_valid.dim() == 4:
            pairs, key_valid = key_valid.bool(), None
        masks = {t: build_mask(q_pos, k_pos, key_valid, window if t == "sliding_attention" else None) for t in types}
        return masks if pairs is None else {t: m & pairs for t, m in masks.items()}

    def forward(self, input_ids=None, inputs_embeds=None, input_pos=None, cache=None, attention_mask=None,
                position_ids=None):
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        h = self.scale_embeddings(h)
        if cache is None:
            q_pos = k_pos = torch.arange(h.shape[1], device=h.device)
            key_valid = attention_mask
        else:
            q_pos, k_pos, key_valid = input_pos, cache.key_positions(h.device), None
        masks = self.masks(q_pos, k_pos, key_valid)
        rope_pos = q_pos if position_ids is None else position_ids
        ropes = {t: self.rope(rope_pos, h.dtype, t) for t in masks}
        for layer in self.layers:
            cos, sin = ropes[layer.layer_type]
            h = layer(h, cos, sin, masks[layer.layer_type], cache, input_pos)
        return self.norm(h)


class Model(nn.Module):
    """Causal LM: ``model`` (TextModel) + ``lm_head``. ``forward`` returns logits ``[B, S, V]``.

    ``inputs_embeds`` is the hook a VLM uses to splice image features into the text embeddings.
    ``logits_to_keep=n`` computes the LM head only for the last n positions (prefill needs one).
    """

    text_model_cls = TextModel

    def __init__(self, cfg: Config, max_seq_len: int | None = None):
        super().__init__()
        self.config = cfg
        self.model = self.text_model_cls(cfg, max_seq_len)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def make_cache(self, batch: int, max_len: int, dtype=None, device=None):
        from ..engine.kv_cache import KVCache

        p = next(self.parameters())
        return KVCache(self.config.num_hidden_layers, batch, self.config.n_kv_heads, max_len,
                       self.config.dim_head, dtype or p.dtype, device or p.device)

    def final_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.finish_logits(self.lm_head(h))

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the family does to the LM head's output (Gemma 2: soft-capping)."""
        return logits

    def forward(self, input_ids=None, *, inputs_embeds=None, input_pos=None, cache=None, attention_mask=None,
                position_ids=None, logits_to_keep: int = 0):
        h = self.model(input_ids, inputs_embeds, input_pos, cache, attention_mask, position_ids)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.final_logits(h)


def sanitize(weights: dict, cfg: Config) -> dict:
    """HF checkpoint tensors -> this module's state dict (drops rotary buffers and a tied lm_head copy)."""
    out = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


# --- llama.cpp GGUF ---------------------------------------------------------------------------------

# GGUF tensor name -> HF name ("{i}" is the layer index); shared by the llama-like families.
GGUF_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def gguf_config(meta: dict, arch: str) -> dict:
    """An HF-style config dict from GGUF metadata (``meta`` maps keys without the ``{arch}.`` prefix too)."""
    g = lambda k, default=None: meta.get(f"{arch}.{k}", default)  # noqa: E731
    n_heads = g("attention.head_count")
    d = {
        "model_type": arch,
        "vocab_size": g("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": g("embedding_length"),
        "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": g("attention.head_count_kv", n_heads),
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": g("context_length", 2048),
        "rope_theta": g("rope.freq_base", 10000.0),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if g("attention.key_length"):
        d["head_dim"] = g("attention.key_length")
    if g("rope.scaling.type") == "linear":
        d["rope_scaling"] = {"rope_type": "linear", "factor": g("rope.scaling.factor")}
    if g("attention.sliding_window"):
        d["sliding_window"] = g("attention.sliding_window")
    return d


#: llama.cpp's Llama converter permutes q/k rows for its interleaved RoPE (its Qwen2, Phi-3, Gemma converters
#: do not): ``gguf_sanitize`` undoes it, and the streaming GGUF loader asks this flag to do the same per tensor.
GGUF_QK_PERMUTED = True


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaved-RoPE permutation of q/k rows (its Llama converter applies it)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_sanitize(weights: dict, cfg: Config) -> dict:
    for name in list(weights):
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            weights[name] = unpermute_qk(weights[name], cfg.num_attention_heads)
        elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            weights[name] = unpermute_qk(weights[name], cfg.n_kv_heads)
    return sanitize(weights, cfg)
