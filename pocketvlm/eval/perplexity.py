"""Perplexity over fixed token windows, scored the way llama.cpp's ``llama-perplexity`` scores them.

Method (llama.cpp ``tools/perplexity/perplexity.cpp``, ``perplexity()`` with no ``--ppl-stride``):

* the token stream is cut into windows of ``context`` tokens starting at ``0, stride, 2*stride, ...``
  (``stride = context``: non-overlapping; only whole windows, so a tail shorter than ``context`` is
  dropped);
* if the tokenizer adds BOS, the first token of *every* window is replaced by BOS (llama.cpp does
  this so each window starts like a document; the replaced token is never a target);
* one full forward per window; only the second half is scored: the logits at positions
  ``first .. context-2`` (``first = context // 2``) predict tokens ``first+1 .. context-1``, i.e.
  ``context - first - 1`` targets per window (255 for 512). The first half is context only, so every
  scored token sees at least ``first`` tokens of history;
* PPL = exp(total NLL / total targets) over all windows; the error estimate is llama.cpp's
  (standard error of the mean NLL, propagated through exp).

With the same token ids and window size, the numbers are directly comparable with
``llama-perplexity -c CONTEXT``. Logits are computed in float32 from a plain ``model(ids)`` forward
(no KV cache; the LM head only over the scored positions when the model takes
``logits_to_keep``), so the measurement exercises the prefill path of whatever modules the model holds.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import ContextWindowError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    stderr: float  # of the PPL, llama.cpp's "+/-"
    nll: float  # mean negative log-likelihood (nats/token)
    n_windows: int
    n_scored: int  # targets scored in all
    window_ppl: list[float] = field(default_factory=list)  # running PPL after each window (llama.cpp's [i] list)


def windows(n_tokens: int, context: int, stride: int | None = None) -> list[int]:
    """Start offsets of the whole ``context``-token windows in ``n_tokens`` tokens."""
    stride = context if stride is None else stride
    if context < 3:  # the scored half must hold at least one target: context - context//2 - 1 >= 1
        raise ContextWindowError(f"context must be at least 3 tokens (the second half is scored), got {context}")
    if stride < 1:
        raise ContextWindowError(f"stride must be a positive number of tokens, got {stride}")
    if n_tokens < context:
        raise ContextWindowError(
            f"the text has {n_tokens} tokens, fewer than one window of {context}; use a longer text or a smaller context")
    return list(range(0, n_tokens - context + 1, stride))


def _split(pm_or_model):
    """(module that maps ids [B, S] -> logits [B, S, V], BOS id or None) from a PocketModel or a module."""
    tok = getattr(pm_or_model, "tokenizer", None)
    if tok is None:  # a bare causal LM (its own ``.model`` is the decoder stack, not what we call)
        return pm_or_model, None
    return pm_or_model.model, (tok.bos_token_id if tok.add_bos_token else None)


def evaluate_perplexity(pm_or_model, token_ids: Sequence[int] | torch.Tensor, context: int = 512,
                        stride: int | None = None, progress: bool = True, *, bos_token_id: int | None = None,
                        max_windows: int | None = None) -> PerplexityResult:
    """Perplexity and its details; see the module docstring for the method.

    ``pm_or_model``: a :class:`pocketvlm.PocketModel` (its tokenizer decides whether windows start
    with BOS) or a bare module called as ``model(ids)``. ``bos_token_id`` overrides the BOS choice
    (pass it for a bare module whose tokenizer adds BOS). ``max_windows`` keeps the first N windows.
    """
    model, bos = _split(pm_or_model)
    if bos_token_id is not None:
        bos = bos_token_id
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    starts = windows(ids.numel(), context, stride)
    if max_windows is not None:
        starts = starts[:max_windows]
    first = context // 2
    device = next(model.parameters()).device
    try:
        keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        keep_arg = False

    nll_sum, nll2_sum, count, running = 0.0, 0.0, 0, []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts), desc=f"perplexity ({context}-token windows)", unit="window")
    with torch.inference_mode():
        for s in starts:
            w = ids[s:s + context].clone()
            if bos is not None:
                w[0] = bos  # llama.cpp: every window starts with BOS, replacing (not shifting) its first token
            if keep_arg:  # LM head only where it is scored: half the head's work (a big share for 256k vocabs)
                logits = model(w[None].to(device), logits_to_keep=context - first)[0, :-1].float()
            else:
                logits = model(w[None].to(device))[0, first:context - 1].float()  # [context-first-1, V]
            targets = w[first + 1:].to(logits.device)
            nll = F.cross_entropy(logits, targets, reduction="none").double()  # [context-first-1]
            nll_sum += nll.sum().item()
            nll2_sum += (nll * nll).sum().item()
            count += nll.numel()
            running.append(math.exp(nll_sum / count))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(ppl=f"{running[-1]:.4f}")
    if bar is not None:
        bar.close()

    mean = nll_sum / count
    var = nll2_sum / count - mean * mean
    err = math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(ppl, ppl * err, mean, len(starts), count, running)


def perplexity(pm_or_model, token_ids: Sequence[int] | torch.Tensor, context: int = 512,
               stride: int | None = None, progress: bool = True, **kw) -> float:
    """Perplexity of ``token_ids`` under the model, llama.cpp's method (second half of each window)."""
    return evaluate_perplexity(pm_or_model, token_ids, context, stride, progress, **kw).ppl
