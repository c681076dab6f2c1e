"""Gemma decoder (Gemma 2B/7B); also the base of Gemma 2 and Gemma 3.

Architecture choices, as in Hugging Face's ``GemmaForCausalLM``:
- RMSNorm that scales by ``1 + weight`` in fp32 (checkpoints store the weights zero-centred);
- token embeddings multiplied by ``sqrt(hidden_size)`` (the factor rounded to the activation dtype first).
  As in HF's ``GemmaTextScaledWordEmbedding`` the scale belongs to the embedding lookup: ``inputs_embeds``
  passed in by a caller are used as given, and ``get_input_embeddings()`` returns the scaled lookup, so a VLM
  that embeds text ids through it and splices image features gets what HF's Gemma VLMs get;
- GeGLU MLP with the tanh-approximated GELU (old configs say ``hidden_act="gelu"`` but mean tanh; HF maps it);
- head_dim 256 (independent of hidden_size / heads), grouped-query attention, tied ``lm_head``.

llama.cpp's Gemma converters store every ``*norm.weight`` as ``1 + weight``; ``gguf_sanitize`` takes the 1 back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import base, llama


@dataclass(frozen=True)
class Config(llama.Config):
    head_dim: int | None = 256
    hidden_act: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True

    @classmethod
    def from_dict(cls, d: dict, **overrides):
        act = d.get("hidden_act") or "gelu_pytorch_tanh"
        # The original Gemma configs say "gelu" but the model was trained with the tanh approximation.
        overrides.setdefault("hidden_act", "gelu_pytorch_tanh" if act == "gelu" else act)
        return base.from_dict(cls, d, rope=base.rope_parameters(d), **overrides)


class RMSNorm(nn.Module):
    """Gemma RMSNorm: ``norm(x) * (1 + weight)`` computed in fp32, then cast back (unlike Llama's order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class DecoderLayer(llama.DecoderLayer):
    norm_cls = RMSNorm


class ScaledEmbedding(nn.Module):
    """What ``get_input_embeddings()`` returns: the text model's scaled lookup.

    It looks ``embed_tokens`` up at call time (it may have been swapped for a quantized embedding) and holds
    no tensors of its own, so it adds nothing to the state dict.
    """

    def __init__(self, text_model: "TextModel"):
        super().__init__()
        object.__setattr__(self, "_text", text_model)  # not a submodule: no cycle, no duplicate state

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._text.embed(input_ids)


class TextModel(llama.TextModel):
    layer_cls = DecoderLayer
    norm_cls = RMSNorm

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        e = self.embed_tokens(input_ids)
        # HF keeps sqrt(hidden) as an fp32 buffer and casts it to the weight dtype before multiplying.
        return e * torch.tensor(self.embed_scale(), dtype=torch.float32, device=e.device).to(e.dtype)

    def embed_scale(self) -> float:
        return float(torch.tensor(self.config.hidden_size ** 0.5, dtype=torch.float32))

    def forward(self, input_ids=None, inputs_embeds=None, input_pos=None, cache=None, attention_mask=None,
                position_ids=None):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        return super().forward(None, inputs_embeds, input_pos, cache, attention_mask, position_ids)


class Model(llama.Model):
    text_model_cls = TextModel

    def get_input_embeddings(self) -> nn.Module:
        return ScaledEmbedding(self.model)


sanitize = llama.sanitize

# --- llama.cpp GGUF ---------------------------------------------------------------------------------

GGUF_TENSORS = {k: v for k, v in llama.GGUF_TENSORS.items() if not k.endswith(".bias")}


def gguf_config(meta: dict, arch: str) -> dict:
    d = llama.gguf_config(meta, arch)
    d["model_type"] = "gemma"
    d["hidden_act"] = "gelu_pytorch_tanh"
    return d


def unfold_norms(weights: dict) -> dict:
    """Undo llama.cpp's Gemma converters, which store every ``*norm.weight`` as ``1 + weight``."""
    return {k: (v - 1.0 if k.endswith("norm.weight") else v) for k, v in weights.items()}


def gguf_sanitize(weights: dict, cfg: Config) -> dict:
    return sanitize(unfold_norms(weights), cfg)  # Gemma's q/k rows are not permuted by the converter
