"""End-to-end tuning of the group scales of a quantized model against the float model's next-token
distribution, in the manner of EfficientQAT's E2E-QP (Chen et al., 2024).

GPTQ and the block-wise tuning (:mod:`pocketvlm.quant.blocktune`) each fit one layer's output. Here every
quantized linear's codes stay as they are and only its group scales move (``scale * (1 + a)``, ``|a| <=
SPAN``, rounded to the stored dtype in the loss as in the file), by Adam on the KL divergence between the
float model's next-token distribution and the quantized model's, over the calibration windows. The teacher is
kept sparse: its top-``TOPK`` log-probabilities per token and one bucket for the rest. Every ``HOLD_OUT``-th
window is not trained on; the tuned scales are kept only if they lower the KL on those windows. Same format.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import formats
from .embedding import TiedQuantHead
from .linear import QuantLinear

TOPK = 64
#: steps ``convert --calibrate`` runs by default: None = one pass over the tuning windows (:func:`one_pass`)
STEPS = None
#: how far a group's scale may move (relative)
SPAN = 0.2
LR = 3e-4
#: every HOLD_OUT-th window is held out to decide whether the tuning is kept
HOLD_OUT = 8
#: windows of a calibration text the tuning takes (all of the text, up to this many; GPTQ takes fewer):
#: on Qwen2.5-Coder-0.5B q4f16_1 the language reference's 145 windows took docstrings from +3.65% (its first 64) to
#: +3.03%; the default text's first 256 (reference, then other modules' docstrings) to +2.46%
WINDOWS = 256


def split(n: int) -> tuple[list[int], list[int]]:
    """The windows trained on and those held out (every ``HOLD_OUT``-th; with fewer windows, the trained ones)."""
    held = [k for k in range(n) if k % HOLD_OUT == HOLD_OUT - 1] if n >= HOLD_OUT else []
    train = [k for k in range(n) if k not in held]
    return train, held or train


def one_pass(n: int) -> int:
    """Steps that visit each of ``n`` windows' trained ones once."""
    return len(split(n)[0])


def teacher_targets(model: nn.Module, windows: Sequence[Mapping[str, torch.Tensor]], topk: int = TOPK,
                    progress: bool = False):
    """Per window: the float model's top-``topk`` next-token log-probabilities and their ids."""
    from tqdm.auto import tqdm

    out = []
    with torch.no_grad():
        for w in tqdm(windows, desc="float model's targets", unit="window", disable=not progress):
            lp = F.log_softmax(_logits(model, w).float(), -1)
            v, i = lp.topk(topk, -1)
            out.append((v, i.int()))
    return out


def _logits(model: nn.Module, window: Mapping[str, torch.Tensor]) -> torch.Tensor:
    out = model(**window)
    out = getattr(out, "logits", out)
    return out[0]


def kl_topk(logits: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), the teacher given by its top-k log-probabilities ``vals``
    at ``idx`` and one bucket for the remaining mass."""
    lq = F.log_softmax(logits.float(), -1)
    lqk = lq.gather(-1, idx.long())
    lp = vals.float()
    p = lp.exp()
    rest_p = (1 - p.sum(-1)).clamp(min=1e-6)
    rest_q = (1 - lqk.exp().sum(-1)).clamp(min=1e-6)
    return ((p * (lp - lqk)).sum(-1) + rest_p * (rest_p.log() - rest_q.log())).mean()


def _linear(x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
    """``F.linear`` with a float32 weight: autocast casts it, else it follows the input's dtype."""
    return F.linear(x, w if torch.is_autocast_enabled() else w.to(x.dtype), bias)


class _Scaled(nn.Module):
    """A symmetric :class:`QuantLinear` as its fixed levels times tunable group scales (dense, differentiable)."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        mode = formats.parse_mode(q.mode)
        self.in_f, self.g = q.in_features, mode.group_size
        self.scale_dtype = q.scales.dtype
        s0 = q.scales.float()
        g = s0.shape[1]
        w = q.dequantize(torch.float32)
        w = F.pad(w, (0, g * self.g - w.shape[1]))
        self.register_buffer("levels", torch.round(w.view(w.shape[0], g, self.g) / s0.clamp(min=1e-30).unsqueeze(-1))
                             .to(torch.int8))
        self.register_buffer("s0", s0)
        self.a = nn.Parameter(torch.zeros_like(s0))
        self.bias = None if q.bias is None else q.bias.detach()

    def scales(self) -> torch.Tensor:
        s = self.s0 * (1 + self.a)
        return s + (s.to(self.scale_dtype).float() - s).detach()  # as stored

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.levels.float() * self.scales().unsqueeze(-1)).view(self.s0.shape[0], -1)[:, :self.in_f]
        return _linear(x, w, self.bias)


def _tunable(model: nn.Module) -> dict[str, QuantLinear]:
    """The model's symmetric quantized linears (not an embedding's table, which a lookup reads)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and not name.endswith(".table") and getattr(mod, "zeros", None) is None \
                and formats.parse_mode(mod.mode).quantized and tuple(mod.scales.shape) == (
                    mod.out_features, -(-mod.k_padded // mod.group_size)):
            out[name] = mod
    return out


class _Frozen(nn.Module):
    """A quantized matmul that is not tuned (a tied head, another format) as its dense weight, so gradients pass."""

    def __init__(self, mod: nn.Module):
        super().__init__()
        table = mod._embedding.table if isinstance(mod, TiedQuantHead) else mod
        self.register_buffer("weight", table.dequantize(torch.float32))
        self.bias = getattr(table, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.weight, self.bias)


def _others(model: nn.Module, tuned: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n not in tuned and not n.endswith(".table")
            and isinstance(m, (QuantLinear, TiedQuantHead))}


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def tune_scales(model: nn.Module, windows: Sequence[Mapping[str, torch.Tensor]], targets, steps: int,
                lr: float = LR, seed: int = 0, autocast=None, progress: bool = True) -> tuple[float, float]:
    """Tune the group scales of ``model``'s quantized linears for ``steps`` steps (one window each) towards
    ``targets`` (:func:`teacher_targets` of the float model on the same ``windows``). Returns the held-out
    KL before and with the tuned scales; those are kept only if they lower it (else the model is as it was)."""
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    autocast = autocast or nullcontext
    quant = _tunable(model)
    scaled = {n: _Scaled(q) for n, q in quant.items()}
    others = _others(model, quant)
    dense = {n: _Frozen(m) for n, m in others.items()}
    train, held = split(len(windows))

    def held_kl() -> float:
        with torch.no_grad(), autocast():
            return sum(float(kl_topk(_logits(model, windows[k]), *targets[k])) for k in held) / len(held)

    was_trainable = [p for p in model.parameters() if p.requires_grad]
    for p in was_trainable:
        p.requires_grad_(False)
    for n, s in {**scaled, **dense}.items():
        _swap(model, n, s)
    try:
        before = held_kl()
        params = [s.a for s in scaled.values()]
        opt = torch.optim.Adam(params, lr=lr)
        order = torch.Generator().manual_seed(seed)
        seq = torch.cat([torch.tensor(train)[torch.randperm(len(train), generator=order)]
                         for _ in range(steps // len(train) + 1)])[:steps]
        with tqdm(total=steps, desc="tuning scales end to end", unit="step", disable=not progress) as bar:
            for t, k in enumerate(seq.tolist()):
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
                with torch.enable_grad(), autocast():
                    loss = kl_topk(_logits(model, windows[k]), *targets[k])
                    loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for p in params:
                        p.clamp_(-SPAN, SPAN)
                bar.update(1)
                bar.set_postfix(kl=f"{loss.item():.4f}")
        after = held_kl()
    finally:
        for n, q in {**quant, **others}.items():
            _swap(model, n, q)
        for p in was_trainable:
            p.requires_grad_(True)
    if after < before:
        with torch.no_grad():
            for n, q in quant.items():
                q.set_scales(scaled[n].scales())
    return before, after
