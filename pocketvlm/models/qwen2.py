"""Qwen2 / Qwen2.5 decoder (also the LLM of LLaVA-OneVision-0.5B).

Same as Llama except: q/k/v projections carry biases (o_proj does not), RMSNorm eps 1e-6, RoPE theta
1e6 in the real checkpoints, usually tied embeddings on the small sizes, and sliding-window attention
only when ``use_sliding_window`` is set (for layers from ``max_window_layers`` on).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import base, llama


@dataclass(frozen=True)
class Config(llama.Config):
    use_sliding_window: bool = False
    max_window_layers: int = 28

    @classmethod
    def from_dict(cls, d: dict, **overrides):
        return base.from_dict(cls, d, rope=base.rope_parameters(d), **overrides)

    def layer_type(self, i: int) -> str:
        if self.layer_types:
            return self.layer_types[i]
        slide = self.use_sliding_window and self.sliding_window and i >= self.max_window_layers
        return "sliding_attention" if slide else "full_attention"


class Attention(llama.Attention):
    @staticmethod
    def qkv_bias(cfg) -> bool:
        return True


class DecoderLayer(llama.DecoderLayer):
    attention_cls = Attention


class TextModel(llama.TextModel):
    layer_cls = DecoderLayer


class Model(llama.Model):
    text_model_cls = TextModel


sanitize = llama.sanitize

GGUF_TENSORS = llama.GGUF_TENSORS


def gguf_config(meta: dict, arch: str) -> dict:
    return llama.gguf_config(meta, arch)


def gguf_sanitize(weights: dict, cfg: Config) -> dict:
    return sanitize(weights, cfg)  # llama.cpp's Qwen2 converter does not permute q/k
