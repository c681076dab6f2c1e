"""Block-wise tuning of calibrated rounding, in the manner of AutoRound (Cheng et al., 2023, "Optimize
Weight Rounding via Signed Gradient Descent for the Quantization of LLMs").

GPTQ rounds each linear for its own output error. After it has rounded the linears of one decoder layer,
:func:`tune_layer` lets every weight move one level up or down from GPTQ's code and every group's scale
by up to ``SCALE_SPAN``, chosen by signed gradient descent (straight-through rounding) on the error of the
*whole layer's* output against the float model's output of that layer on the float model's own inputs. So
a layer also corrects the drift of the quantized layers before it, and the attention and MLP non-linearities
are in the loss. The result is the same format: codes and one scale per group.
"""
from __future__ import annotations

import random
from typing import Mapping, Sequence

import torch
from torch import nn

from . import formats

#: how far a group's scale may move from GPTQ's (relative)
SCALE_SPAN = 0.2
#: windows per step
BATCH = 4
#: steps per layer that ``convert --calibrate`` tunes by default
STEPS = 100


class Rounded:
    """One linear's GPTQ result as tunable parameters: levels ``clamp(codes - offset + round(v))`` with ``v``
    in ``[-1, 1]`` (a weight moves one level only where the gradient keeps pushing it: GPTQ's levels already
    compensate each other, and starting from its unrounded residuals instead made layers worse on
    Qwen2.5-0.5B), scales ``scale * (1 + a)``."""

    def __init__(self, weight: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mode: formats.QuantMode):
        self.mode, self.in_f = mode, weight.shape[1]
        self.dtype = weight.dtype
        self.q0 = codes.float() - mode.offset
        self.s0 = scales.float()
        self.v = torch.zeros_like(self.q0, requires_grad=True)
        self.a = torch.zeros_like(self.s0, requires_grad=True)

    def levels(self, v: torch.Tensor) -> torch.Tensor:
        v = v + (torch.round(v) - v).detach()  # straight-through rounding
        return (self.q0 + v).clamp(-self.mode.offset, self.mode.max_code - self.mode.offset)

    def weight(self) -> torch.Tensor:
        s = self.s0 * (1 + self.a)
        s = s + (s.to(self.mode.torch_scale_dtype).float() - s).detach()  # as stored
        g = self.mode.group_size
        w = (self.levels(self.v).view(self.q0.shape[0], -1, g) * s.unsqueeze(-1)).view_as(self.q0)
        return w[:, :self.in_f].to(self.dtype)

    def step(self, lr: float) -> None:
        with torch.no_grad():
            for p, bound in ((self.v, 1.0), (self.a, SCALE_SPAN)):
                if p.grad is not None:
                    p.sub_(lr * torch.sign(p.grad)).clamp_(-bound, bound)
                    p.grad = None

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes uint8, scales)`` in the stored format."""
        with torch.no_grad():
            scales = (self.s0 * (1 + self.a)).to(self.mode.torch_scale_dtype)
            codes = (torch.round(self.levels(self.v)) + self.mode.offset).to(torch.uint8)  # exact: no truncation
        return codes, scales


def _loss(layer: nn.Module, params: Mapping[str, torch.Tensor], x, args, y) -> torch.Tensor:
    out = torch.func.functional_call(layer, dict(params), (x, *args[0]), args[1])
    return (out.float() - y.float()).square().mean()


def tune_layer(layer: nn.Module, rounded: Mapping[str, Rounded], xs: Sequence[torch.Tensor], args: Sequence,
               ys: Sequence[torch.Tensor], steps: int, lr: float | None = None, seed: int = 0) -> tuple[float, float]:
    """Tune ``rounded`` (``{name of the linear within layer: Rounded}``) for ``steps`` steps so that ``layer``
    with those weights maps the inputs ``xs`` (per window, with its other arguments ``args``) to the float
    targets ``ys``. Keeps the tuned values only if they lower the error over all windows. Returns the
    layer's mean squared error over all windows before and after (after <= before). ``lr`` (default
    ``1 / steps``) decays linearly to 0, as AutoRound's."""
    lr = 1.0 / steps if lr is None else lr
    order = random.Random(seed)
    idx = list(range(len(xs)))

    def total() -> float:
        with torch.no_grad():
            params = {f"{n}.weight": r.weight() for n, r in rounded.items()}
            return sum(float(_loss(layer, params, x, a, y)) for x, a, y in zip(xs, args, ys))

    before = total()  # v = a = 0: GPTQ's rounding
    with torch.enable_grad():
        for t in range(steps):
            order.shuffle(idx)
            params = {f"{n}.weight": r.weight() for n, r in rounded.items()}  # once per step: it costs a window
            sum(_loss(layer, params, xs[k], args[k], ys[k]) for k in idx[:BATCH]).backward()
            for r in rounded.values():
                r.step(lr * (1 - t / steps))
    after = total()
    if after < before:
        return before / len(xs), after / len(xs)
    for r in rounded.values():  # not better over all windows: back to GPTQ's rounding
        with torch.no_grad():
            r.v.zero_()
            r.a.zero_()
    return before / len(xs), before / len(xs)

