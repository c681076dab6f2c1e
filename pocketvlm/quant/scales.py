"""Choosing a group's scale: the one that minimises the group's reconstruction error.

MLC's round-to-nearest (RTN) sets ``scale = max|w| / offset``: the single largest weight fixes the step
for the whole group, and the other 31 weights of a 4-bit group share 15 levels spread to fit it. A
smaller step clips that one weight a little and rounds the other 31 more finely, which is often the
better trade. :func:`search_scales` tries a grid of candidate scales per group,

    scale = max|w| * f / offset,   f = 1, 1 - 1/n_grid, ..., (1 - span),   rounded to the stored dtype,

plus one least-squares refit of the best candidate (``scale = sum(h w q) / sum(h q^2)`` for its codes),
and keeps, per group, the candidate with the smallest weighted error ``sum_j h_j (w_j - scale * q_j)^2``.
The weights ``h`` matter: plain squared error (``h = 1``) lets the search clip a group's largest weights,
and on Qwen2.5-0.5B that *raised* perplexity (+11.4% over the unquantized model vs RTN's +6.8%): the large
weights of an LLM are the ones that matter. :func:`magnitude_weights` (``h = w^2``, llama.cpp's choice for
its k-quants without an importance matrix) keeps them and gave +4.6%; times a per-input-column importance
(the mean square of the layer's inputs) when calibration data is at hand. ``f = 1`` is exactly RTN's scale and a candidate only wins by being strictly better, so the
search never increases a group's error over RTN (property-tested). The file format does not change:
codes and one scale per group, as before, so every kernel and package reads the result unchanged.
"""
from __future__ import annotations

import torch

#: grid of the search: ``n_grid`` candidate factors from 1 down to ``1 - span`` (plus the refit).
N_GRID = 20
SPAN = 0.2


def magnitude_weights(wg: torch.Tensor) -> torch.Tensor:
    """Error weights ``w^2`` (plus a small floor, so a group of near-zero weights still has a preference)."""
    w2 = wg.float().square()
    return w2 + 1e-3 * w2.mean(-1, keepdim=True)


def _codes(wg: torch.Tensor, s: torch.Tensor, offset: int, max_code: int) -> torch.Tensor:
    """Signed integer levels (``code - offset``) of ``wg`` at step ``s`` (0 where ``s == 0``), as float."""
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(wg / safe).clamp_(-offset, max_code - offset)
    return torch.where(s > 0, q, torch.zeros_like(q))


def _error(wg: torch.Tensor, q: torch.Tensor, s: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
    d = (wg - q * s).square_()
    if h is not None:
        d.mul_(h)
    return d.sum(-1, keepdim=True)


def search_scales(wg: torch.Tensor, offset: int, max_code: int, scale_dtype: torch.dtype,
                  h: torch.Tensor | None = None, *, n_grid: int = N_GRID, span: float = SPAN) -> torch.Tensor:
    """Per-group scales ``[..., G]`` (in ``scale_dtype``) for float32 groups ``wg [..., G, g]`` that
    minimise the (``h``-weighted, ``h`` broadcastable to ``wg``) squared reconstruction error; codes
    are then ``clamp(round(w / scale)) + offset`` as for RTN."""
    wg = wg.float()
    amax = wg.abs().amax(-1, keepdim=True)
    best_s = (amax / offset).to(scale_dtype).float()  # f = 1: RTN's scale, exactly
    best_q = _codes(wg, best_s, offset, max_code)
    best_e = _error(wg, best_q, best_s, h)
    for k in range(1, n_grid):
        s = (amax * (1 - span * k / (n_grid - 1)) / offset).to(scale_dtype).float()
        q = _codes(wg, s, offset, max_code)
        e = _error(wg, q, s, h)
        better = e < best_e
        best_s = torch.where(better, s, best_s)
        best_q = torch.where(better, q, best_q)
        best_e = torch.where(better, e, best_e)
    # one least-squares refit of the winner's step for its own codes, re-rounded
    hq = best_q if h is None else best_q * h
    num, den = (hq * wg).sum(-1, keepdim=True), (hq * best_q).sum(-1, keepdim=True)
    s = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), best_s).clamp_(min=0)
    s = s.to(scale_dtype).float()
    e = _error(wg, _codes(wg, s, offset, max_code), s, h)
    best_s = torch.where(e < best_e, s, best_s)
    return best_s.squeeze(-1).to(scale_dtype)
