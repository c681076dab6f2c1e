"""GPTQ rounding for one layer: quantize ``W [out, in]`` column by column, pushing each column's rounding
error onto the columns not yet quantized through the inverse Hessian of the layer's inputs
(Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

For a linear layer ``y = x W^T`` with calibration inputs ``X [tokens, in]``, the output error of a
perturbed weight is ``||(W - W_hat) X^T||^2 = tr((W - W_hat) H (W - W_hat)^T) / 2`` with ``H = 2 X^T X``.
Quantizing column ``j`` with error ``e_j`` (per output row) and updating the remaining columns by
``-e_j / [H^-1]_jj * [H^-1]_{j, j+1:}`` is the optimal compensation (OBS); GPTQ does it in a fixed column
order, with the inverse Hessian's upper Cholesky factor standing in for the sequence of inverses, and
applies the updates lazily in blocks of columns.

The output is the same format as round-to-nearest (MLC's symmetric group quantization: uint8 codes and
one scale per ``group_size`` input columns), so files, kernels and speed do not change. With ``act_order``
(the default) the group scales are fixed up front from the original weights; without it a group's scale is
chosen when GPTQ reaches the group's first column, from its weights *as updated so far*. Either way by RTN's
``max|w| / offset``, or (``search=True``) by :func:`pocketvlm.quant.scales.search_scales` weighted by the
diagonal of ``H`` (the mean square of each input column) times ``w^2``.
"""
from __future__ import annotations

import torch

from ..errors import QuantizationError
from . import formats
from .scales import magnitude_weights, search_scales

#: Damping added to H's diagonal, as a fraction of its mean (GPTQ's ``percdamp``).
DAMP = 0.01
#: Output rows rounded at once. Rows are independent (one inverse Hessian for all), so a tall weight (an LM
#: head of 152k or 262k rows) goes through in slices: GPTQ's temporaries (~11 float32 copies of what it
#: rounds, measured on a 151937 x 896 head) then cover one slice, not the whole table.
ROWS = 16384


def _damped(Hp: torch.Tensor, damp: float) -> torch.Tensor:
    """``Hp`` as GPTQ sees it (float32 copy): inputs that were zero on every calibration token (and the
    padding) get 1 on the diagonal, so they round plainly; plus the damping."""
    Hd = Hp.float().clone()
    dead = Hd.diagonal() <= 0
    Hd[dead, dead] = 1.0
    Hd.diagonal().add_(damp * Hd.diagonal().mean())
    return Hd


def _inverse_factor(Hd: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of ``Hd^-1`` (GPTQ's stand-in for the sequence of inverses)."""
    Hd = Hd.clone()
    for extra in (0.0, 0.1, 1.0):  # more damping if H is too ill-conditioned for float32 Cholesky
        if extra:
            Hd.diagonal().add_(extra * Hd.diagonal().mean())
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return U
    raise QuantizationError("GPTQ: the calibration Hessian is not positive definite even after damping; "
                            "calibrate on more (or more varied) text")


def _group_scales(W: torch.Tensor, mode: formats.QuantMode, search: bool, hdiag: torch.Tensor) -> torch.Tensor:
    """Scales ``[out, groups]`` of the group-shaped weights ``W [out, kp]``, by RTN or the weighted search."""
    wg = W.view(W.shape[0], -1, mode.group_size)
    if search:
        h = hdiag.view(-1, mode.group_size) * magnitude_weights(wg)
        return search_scales(wg, mode.offset, mode.max_code, mode.torch_scale_dtype, h)
    return (wg.abs().amax(-1) / mode.offset).to(mode.torch_scale_dtype)


def _round_columns(W: torch.Tensor, U: torch.Tensor, mode: formats.QuantMode, block: int, col_scale=None,
                   scales=None, search: bool = False, hdiag=None) -> torch.Tensor:
    """One GPTQ pass over ``W [out, kp]`` (consumed) in its column order: codes ``[out, kp]`` (uint8). With
    ``col_scale [out, kp]`` each column's step is given; otherwise a group's scale is chosen (and written to
    ``scales``) when its first column is reached."""
    g = mode.group_size
    out_f, kp = W.shape
    codes = torch.empty(out_f, kp, dtype=torch.uint8, device=W.device)
    lo, hi = -mode.offset, mode.max_code - mode.offset
    for b0 in range(0, kp, block):
        b1 = min(b0 + block, kp)
        W1, U1 = W[:, b0:b1].clone(), U[b0:b1, b0:b1]
        E1 = torch.zeros_like(W1)
        s = None
        for j in range(b1 - b0):
            col = b0 + j
            if col_scale is not None:
                s = col_scale[:, col]
            elif col % g == 0:  # the group starting here: its scale from its current (updated) weights
                s16 = _group_scales(W1[:, j:j + g], mode, search, hdiag[col:col + g])
                scales[:, col // g] = s16.squeeze(1)
                s = s16.squeeze(1).float()
            x = W1[:, j]
            safe = torch.where(s > 0, s, torch.ones_like(s))
            q = torch.where(s > 0, torch.round(x / safe).clamp_(lo, hi), torch.zeros_like(x))
            codes[:, col] = (q + mode.offset).to(torch.uint8)
            err = (x - q * s) / U1[j, j]
            W1[:, j:] -= err.unsqueeze(1) * U1[j, j:].unsqueeze(0)
            E1[:, j] = err
        W[:, b1:] -= E1 @ U[b0:b1, b1:]
    return codes


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, mode: str | formats.QuantMode, *, search: bool = True,
                  act_order: bool = True, damp: float = DAMP, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-quantize ``w [out, in]`` with the input Hessian ``H [in, in]`` (``sum x x^T`` over calibration
    tokens; its scale does not matter). Returns ``(codes uint8 [out, in_padded], scales [out, groups])``
    exactly as :func:`pocketvlm.quant.formats.quantize` does, for :func:`~pocketvlm.quant.linear.quant_linear_from_codes`.

    ``act_order``: quantize the columns with the largest input energy first (GPTQ's "act-order"), so
    their errors are the ones compensated by the most other columns. Group scales are then fixed up front
    from the original weights ("static groups", the file keeps consecutive groups); without it each
    group's scale is taken when its first column is reached, from the weights updated so far.
    Runs in float32 even inside a bf16 autocast forward (calibration's), where its updates ran in bf16
    before 2026-12-05."""
    with torch.autocast(w.device.type, enabled=False):  # float32 throughout, even inside a bf16 forward
        return _gptq(w, H, formats.parse_mode(mode), search, act_order, damp, block)


def _gptq(w, H, mode: formats.QuantMode, search: bool, act_order: bool, damp: float, block: int):
    if not mode.quantized:
        raise QuantizationError(f"GPTQ needs a quantized mode; {mode.name} keeps weights in {mode.dtype}")
    if w.dim() != 2 or H.shape != (w.shape[1], w.shape[1]):
        raise QuantizationError(f"GPTQ: weight {tuple(w.shape)} and Hessian {tuple(H.shape)} do not match")
    g = mode.group_size
    out_f, in_f = w.shape
    kp = formats.padded_in_features(in_f, g)
    hdiag = torch.zeros(kp, device=w.device)
    hdiag[:in_f] = H.diagonal().float().clamp(min=0)
    Hp = torch.zeros(kp, kp, device=w.device)
    Hp[:in_f, :in_f] = H.float()
    Hd = _damped(Hp, damp)
    perm = torch.argsort(hdiag, descending=True, stable=True) if act_order else None
    U = _inverse_factor(Hd[perm][:, perm] if act_order else Hd)
    unperm = torch.argsort(perm) if act_order else None
    codes = torch.empty(out_f, kp, dtype=torch.uint8, device=w.device)
    scales = torch.empty(out_f, kp // g, dtype=mode.torch_scale_dtype, device=w.device)
    for r0 in range(0, out_f, ROWS):  # rows are independent given U: slices bound the working set
        r1 = min(r0 + ROWS, out_f)
        W0 = torch.zeros(r1 - r0, kp, device=w.device)
        W0[:, :in_f] = w[r0:r1].float()
        if act_order:
            scales[r0:r1] = _group_scales(W0, mode, search, hdiag)  # [rows, groups], in file order
            col_scale = scales[r0:r1].float().repeat_interleave(g, 1)[:, perm]  # [rows, kp], in GPTQ's order
            codes[r0:r1] = _round_columns(W0[:, perm], U, mode, block, col_scale=col_scale)[:, unperm]
        else:
            codes[r0:r1] = _round_columns(W0, U, mode, max(g, block // g * g), scales=scales[r0:r1], search=search,
                                          hdiag=hdiag)
    return codes, scales
