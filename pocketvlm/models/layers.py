"""Primitives shared by the decoder families: RMSNorm, rotary embeddings (with the scaling types real
checkpoints use), one attention function, and the masks for causal / sliding-window attention.

Family quirks (Gemma's ``1 + weight`` norm, soft-capping, QK-norm) live in the family files, not here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedArchitectureError


class RMSNorm(nn.Module):
    """Llama-style RMSNorm: normalise in fp32, cast back, then scale by ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# --- rotary position embeddings -------------------------------------------------------------------

def _inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def rope_inv_freq(params: dict, dim: int, max_position_embeddings: int, max_seq_len: int | None = None):
    """Inverse frequencies ``[dim/2]`` and the attention scaling factor for a RoPE config.

    Supported ``rope_type``: default, linear, llama3 (Llama 3.1/3.2), yarn (Qwen2.5 long context),
    longrope (Phi-3 128k; the long factors are used when ``max_seq_len`` exceeds the original context,
    the short ones otherwise — fixed at build time so the KV cache stays consistent).
    """
    with torch.device("cpu"):  # models are built on the meta device; these small tables must be real
        return _rope_inv_freq(params, dim, max_position_embeddings, max_seq_len)


def _rope_inv_freq(params: dict, dim: int, max_position_embeddings: int, max_seq_len: int | None):
    kind = params.get("rope_type", "default")
    theta = float(params.get("rope_theta", 10000.0))
    dim = int(dim * params.get("partial_rotary_factor", 1.0))
    inv = _inv_freq(theta, dim)
    scale = 1.0
    if kind == "default":
        pass
    elif kind == "linear":
        inv = inv / params["factor"]
    elif kind == "llama3":
        factor, lo, hi = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > old / lo, inv / factor, inv)
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, smoothed, inv)
    elif kind == "yarn":
        factor = params["factor"]
        old = params.get("original_max_position_embeddings") or max_position_embeddings
        mscale = params.get("mscale")
        mscale_all = params.get("mscale_all_dim")
        def get_mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
        if params.get("attention_factor") is not None:
            scale = params["attention_factor"]
        elif mscale and mscale_all:
            scale = get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
        else:
            scale = get_mscale(factor)
        beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

        def corr_dim(rot):
            return (dim * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(theta))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if params.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
    elif kind == "longrope":
        old = params.get("original_max_position_embeddings") or max_position_embeddings
        use_long = max_seq_len is not None and max_seq_len > old
        ext = torch.tensor(params["long_factor" if use_long else "short_factor"], dtype=torch.float32)
        inv = inv / ext
        factor = params.get("factor") or max_position_embeddings / old
        scale = params.get("attention_factor") or (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old)))
    else:
        raise UnsupportedArchitectureError(
            f"RoPE scaling type {kind!r} is not supported (supported: default, linear, llama3, yarn, longrope)")
    return inv, float(scale)


class RotaryEmbedding(nn.Module):
    """cos/sin for given positions, computed in fp32 as Hugging Face does, cast to the activation dtype."""

    def __init__(self, inv_freq: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.to("cpu"), persistent=False)
        self.scale = scale

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        # positions [B, S] or [S] -> cos, sin [B or 1, 1, S, D]
        if positions.dim() == 1:
            positions = positions[None]
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype)[:, None], (emb.sin() * self.scale).to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    rot = cos.shape[-1]
    if rot == q.shape[-1]:
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    # partial rotary (only the first ``rot`` dims rotate)
    qr, qp = q[..., :rot], q[..., rot:]
    kr, kp = k[..., :rot], k[..., rot:]
    return (torch.cat((qr * cos + rotate_half(qr) * sin, qp), -1),
            torch.cat((kr * cos + rotate_half(kr) * sin, kp), -1))


# --- attention ------------------------------------------------------------------------------------

def attention(q, k, v, mask, scale: float | None = None, softcap: float | None = None):
    """Scaled dot-product attention with grouped KV heads. q [B,H,S,D], k/v [B,Hkv,T,D], mask bool [.,1,S,T]."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    # Gemma 2's tanh soft-capping of the scores has no fused kernel: spell it out.
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    s = torch.tanh(s / softcap) * softcap
    # the dtype's minimum, not -inf: a query that sees no key (padding + sliding window) must not become NaN
    s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def build_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, key_valid: torch.Tensor | None = None,
               window: int | None = None) -> torch.Tensor:
    """Boolean attention mask [B or 1, 1, S, T]: causal, optionally sliding-window and key padding.

    q_pos [S] or [B,S]; k_pos [T]; key_valid [B,T] (False for padding).
    """
    if q_pos.dim() == 1:
        q_pos = q_pos[None]
    m = k_pos[None, None, :] <= q_pos[:, :, None]
    if window is not None:
        m = m & (k_pos[None, None, :] > q_pos[:, :, None] - window)
    if key_valid is not None:
        m = m & key_valid[:, None, :].bool()
    return m[:, None]
