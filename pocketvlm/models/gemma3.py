"""Gemma 3 text decoder (``model_type`` "gemma3_text", ``Gemma3ForCausalLM``: Gemma 3 270M/1B, and the
language model of the Gemma 3 VLMs). Gemma 2's layout (sandwich norms, ``query_pre_attn_scalar``, scaled
embeddings, tied head, optional final soft-capping) plus, as in Hugging Face's implementation:

- QK-norm: ``q_norm`` / ``k_norm`` (Gemma ``1 + weight`` RMSNorm over head_dim) after the projections,
  before RoPE;
- no attention soft-capping: HF's Gemma 3 attention never passes ``attn_logit_softcapping`` on, so a value
  in the config has no effect there, nor here;
- sliding-window ("local") and global layers by ``layer_types`` (old configs: every
  ``sliding_window_pattern``-th layer, default 6, is global);
- two RoPE tables: local layers use ``rope_local_base_freq`` (10k, no scaling), global layers
  ``rope_theta`` (1M) with the optional ``rope_scaling`` (linear factor 8 on the 4B+ models).
  transformers 5 writes this as ``rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}``;
  both styles are read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UnsupportedArchitectureError
from . import base, gemma, gemma2, llama
from .layers import RotaryEmbedding, rope_inv_freq

FULL, SLIDING = "full_attention", "sliding_attention"


def _rope(p: dict | None, theta: float) -> dict:
    p = dict(p or {})
    p["rope_type"] = p.get("rope_type", p.pop("type", "default")) or "default"
    p.pop("type", None)
    p.setdefault("rope_theta", theta)
    return p


def rope_tables(d: dict) -> tuple[dict, dict]:
    """(global, local) RoPE parameters from either config style."""
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and (FULL in rp or SLIDING in rp):
        return (_rope(rp.get(FULL), d.get("rope_theta", 1_000_000.0)),
                _rope(rp.get(SLIDING), d.get("rope_local_base_freq", 10_000.0)))
    glob = dict(rp) if isinstance(rp, dict) else {}
    glob.update(d.get("rope_scaling") or {})
    return _rope(glob, d.get("rope_theta", 1_000_000.0)), _rope(None, d.get("rope_local_base_freq", 10_000.0))


@dataclass(frozen=True)
class Config(gemma2.Config):
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window_pattern: int = 6
    rope_local: dict = field(default_factory=dict)
    use_bidirectional_attention: bool | None = False

    @classmethod
    def from_dict(cls, d: dict, **overrides):
        if d.get("use_bidirectional_attention"):
            raise UnsupportedArchitectureError(
                "Gemma 3 with use_bidirectional_attention (an embedding model) is not a causal LM; "
                "pocketvlm runs only causal Gemma 3 checkpoints")
        glob, local = rope_tables(d)
        overrides.setdefault("hidden_act", d.get("hidden_activation") or "gelu_pytorch_tanh")
        return base.from_dict(cls, d, rope=glob, rope_local=local, **overrides)

    def layer_type(self, i: int) -> str:
        if self.layer_types:
            return self.layer_types[i]
        return SLIDING if (i + 1) % self.sliding_window_pattern else FULL


class Attention(gemma2.Attention):
    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.softcap = None  # see the module docstring
        self.q_norm = gemma.RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = gemma.RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def project_qkv(self, x):
        q, k, v = super().project_qkv(x)  # [B, H, S, D]
        return self.q_norm(q), self.k_norm(k), v


class DecoderLayer(gemma2.DecoderLayer):
    attention_cls = Attention


class TextModel(gemma2.TextModel):
    layer_cls = DecoderLayer

    def __init__(self, cfg: Config, max_seq_len: int | None = None):
        super().__init__(cfg, max_seq_len)
        inv, scale = rope_inv_freq(cfg.rope_local, cfg.dim_head, cfg.max_position_embeddings, max_seq_len)
        self.rotary_local = RotaryEmbedding(inv, scale)

    def rope(self, positions, dtype, layer_type: str):
        return (self.rotary_local if layer_type == SLIDING else self.rotary)(positions, dtype)


class Model(gemma2.Model):
    text_model_cls = TextModel


def sanitize(weights: dict, cfg: Config) -> dict:
    # Gemma3ForConditionalGeneration checkpoints keep the text weights under ``model.language_model``;
    # a text-only load of such a folder is handled by the VLM family, not here.
    return llama.sanitize(weights, cfg)


# --- llama.cpp GGUF ---------------------------------------------------------------------------------

GGUF_TENSORS = {
    **gemma2.GGUF_TENSORS,
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}


def gguf_config(meta: dict, arch: str) -> dict:
    """Gemma 3 from GGUF metadata. ``{arch}.rope.freq_base`` is the global base, ``rope.freq_base_swa`` the
    local one (llama.cpp's default 10k); unless the file says otherwise, one global layer in 6, as Hugging
    Face's defaults do (a per-layer pattern: :func:`pocketvlm.models.gemma2.gguf_config`)."""
    d = gemma2.gguf_config(meta, arch)
    d["model_type"] = "gemma3_text"
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, int) and pattern > 0:
        d["sliding_window_pattern"] = pattern
    d["rope_local_base_freq"] = float(meta.get(f"{arch}.rope.freq_base_swa", 10_000.0))
    return d


def gguf_sanitize(weights: dict, cfg: Config) -> dict:
    return sanitize(gemma.unfold_norms(weights), cfg)
