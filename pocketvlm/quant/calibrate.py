"""Calibrated quantization: GPTQ rounding (:mod:`pocketvlm.quant.gptq`), layer by layer, on a short text.

:func:`calibrate_model` is :func:`pocketvlm.quant.quantize_model` with calibrated rounding; it returns
the same ``{module name: mode}`` record and leaves the same modules in the same format (codes + one scale
per group), so packages, kernels and speed are unchanged. Steps:

1. embeddings are quantized as ``quantize_model`` does (error-minimising scales);
2. one pass over the calibration windows records the input of every decoder layer (the hidden states
   entering the first layer, and each layer's other arguments: rotary tables, masks);
3. layer by layer: the layer runs on its recorded inputs with hooks summing ``x x^T`` for each of its
   linears, the linears are GPTQ-quantized and swapped in, and the *quantized* layer runs again to give the
   next layer its inputs (so each layer compensates the error of the ones before it, as in GPTQ);
4. the linears outside the decoder layers (the LM head; with a tied head, the embedding table it shares,
   whose codes are replaced by the GPTQ ones) are calibrated on one more full pass.

The calibration text is cut into windows of ``context`` tokens (BOS first where the tokenizer adds it).
A vision-language model can instead be calibrated on conversations with their images: each window is then
a dict of the model's inputs (``input_ids`` with the image slots, ``pixel_values``), so the language model's
Hessians see the projected image features it answers from.
The default text (:func:`default_text`) ships with Python: the language reference topics of
``pydoc_data``, minus the topics :data:`HELD_OUT_TOPICS` that ``benchmarks/perplexity.py`` measures on, then
the docstrings of :data:`DOCSTRING_MODULES` (never those of :data:`HELD_OUT_MODULES`, the benchmark's other text).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence, Union

import torch
from torch import nn

from ..errors import QuantizationError
from . import e2etune, formats
from .apply import TIED_PREFIX, Skip, _set, module_mode, quantize_module, tied_head
from .blocktune import Rounded, tune_layer
from .gptq import gptq_quantize
from .embedding import QuantEmbedding
from .linear import quant_linear_from_codes

#: pydoc_data topics that ``benchmarks/perplexity.py`` scores: never part of the default calibration text.
HELD_OUT_TOPICS = ("execmodel", "naming", "types", "specialnames", "typesseq")
#: standard-library modules whose docstrings ``benchmarks/perplexity.py`` scores: never in the default text
HELD_OUT_MODULES = ("argparse", "pathlib", "json", "collections", "functools", "textwrap", "shutil", "subprocess",
                    "logging", "dataclasses", "typing", "enum", "fractions", "statistics", "calendar")
#: standard-library modules (importing them has no side effects) whose docstrings follow the
#: topics in the default text. GPTQ takes the text's first windows (topics); the end-to-end tuning takes them all.
DOCSTRING_MODULES = (
    "abc", "ast", "asyncio", "base64", "bisect", "bz2", "cmd", "code", "codecs", "configparser", "contextlib", "copy",
    "csv", "datetime", "decimal", "difflib", "doctest", "email.message", "email.utils", "fnmatch", "ftplib",
    "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http.client",
    "http.cookies", "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "locale", "lzma", "mailbox",
    "mimetypes", "numbers", "operator", "optparse", "os", "pdb", "pickle", "pkgutil", "platform", "plistlib",
    "poplib", "pprint", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve",
    "shlex", "smtplib", "socket", "socketserver", "string", "struct", "sysconfig", "tarfile", "tempfile",
    "threading", "timeit", "tokenize", "trace", "traceback", "types", "unittest", "urllib.parse", "urllib.request",
    "uuid", "warnings", "wave", "weakref", "zipfile")
CONTEXT = 512
WINDOWS = 64
#: modes GPTQ can round for (symmetric MLC group quantization)
CALIBRATED_BITS = (3, 4, 8)


def module_docstrings(names: Sequence[str], skip: Iterable[str] = ()) -> list[str]:
    """The docstrings (``inspect.getdoc``) of the modules ``names`` and of their public members defined there
    (in name order), each once, none of ``skip``. A module this Python cannot import is left out (the text's
    sha256, which config.json records, then differs)."""
    import importlib
    import inspect
    import warnings

    seen, out = set(skip), []
    with warnings.catch_warnings():  # reading a deprecated alias (typing.io) warns
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in names:
            try:
                mod = importlib.import_module(name)
            except ImportError:  # an optional extension this Python was built without (lzma, bz2)
                continue
            members = [getattr(mod, n) for n in sorted(vars(mod)) if not n.startswith("_")]
            for obj in [mod] + [m for m in members if getattr(m, "__module__", None) == name]:
                doc = inspect.getdoc(obj)
                if doc and doc not in seen:
                    seen.add(doc)
                    out.append(doc)
    return out


def default_text() -> str:
    """The default calibration text, which ships with every CPython: Python's own language reference
    (``pydoc_data.topics``) without :data:`HELD_OUT_TOPICS`, then the docstrings of :data:`DOCSTRING_MODULES`
    without any that :data:`HELD_OUT_MODULES` hold."""
    from pydoc_data.topics import topics

    docs = module_docstrings(DOCSTRING_MODULES, skip=module_docstrings(HELD_OUT_MODULES))
    return "\n\n".join([topics[k] for k in sorted(topics) if k not in HELD_OUT_TOPICS] + docs)


def check_mode(mode: str | formats.QuantMode) -> formats.QuantMode:
    mm = formats.parse_mode(mode)
    if mm.bits not in CALIBRATED_BITS:
        raise QuantizationError(
            f"--calibrate rounds quantized weights; mode {mm.name} keeps weights in {mm.dtype}, so there is nothing "
            f"to calibrate (use one of {', '.join(n for n, m in formats.MODES.items() if m.bits in CALIBRATED_BITS)})")
    return mm


def calibration_windows(token_ids: Sequence[int] | torch.Tensor, context: int = CONTEXT, windows: int = WINDOWS,
                        bos_token_id: int | None = None) -> torch.Tensor:
    """``[n, context]`` non-overlapping windows from the start of the text (at most ``windows``)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if context < 2:
        raise QuantizationError(f"calibration context must be at least 2 tokens, got {context}")
    n = min(windows, ids.numel() // context)
    if n < 1:
        raise QuantizationError(
            f"the calibration text has {ids.numel()} tokens, fewer than one window of {context}; "
            "give a longer text (a few thousand words) or leave --calibrate without a file for the default text")
    out = ids[:n * context].view(n, context).clone()
    if bos_token_id is not None:
        out[:, 0] = bos_token_id
    return out


def _decoder_layers(model: nn.Module, targets: Iterable[str]) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` holding most of the target linears (the decoder's layers)."""
    targets = list(targets)
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod):
            n = sum(t.startswith(name + ".") for t in targets)
            if n > best_n:
                best, best_n = (name, mod), n
    if best is None:
        raise QuantizationError("calibration found no decoder layers holding the linears to quantize")
    return best


def _fast_matmuls(device: torch.device):
    """The calibration forwards (not GPTQ itself) under bf16 autocast where the hardware multiplies bf16
    natively: ~5x faster on AMX/AVX-512-BF16 CPUs; the Hessians are still summed in float32."""
    from .paths import cpu_dense_dtype

    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_dense_dtype() == torch.bfloat16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=native)


class _Stop(Exception):
    pass


Windows = Union[torch.Tensor, Sequence[Mapping[str, torch.Tensor]]]


def _inputs(windows) -> list[dict]:
    """Each window as the model's keyword arguments: a row of token ids, or a dict of inputs as given."""
    if isinstance(windows, torch.Tensor):
        return [{"input_ids": w.unsqueeze(0)} for w in windows]
    out = [dict(w) for w in windows]
    if not out or any(not isinstance(w.get("input_ids"), torch.Tensor) for w in out):
        raise QuantizationError("calibration needs at least one window, each with its input_ids")
    return out


def _record_layer_inputs(model: nn.Module, layers: nn.ModuleList, windows: list[dict]):
    """Per window: the hidden states entering the first layer and each layer's remaining arguments."""
    first, rest = [], []
    for w in windows:
        args_per_layer = []

        def make(i):
            def capture(*args, **kwargs):
                if i == 0:
                    first.append(args[0].detach())
                args_per_layer.append((args[1:], kwargs))
                if i == len(layers) - 1:
                    raise _Stop
                return args[0]  # skipped: only the arguments are wanted here
            return capture

        try:
            for i, layer in enumerate(layers):
                layer.forward = make(i)
            with torch.no_grad():
                model(**w)
        except _Stop:
            pass
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)
        rest.append(args_per_layer)
    if len(first) != len(windows):
        raise QuantizationError("calibration could not trace the model's decoder layers")
    return first, rest


def _hessian_hooks(modules: Mapping[str, nn.Module]):
    hs = {n: torch.zeros(m.in_features, m.in_features) for n, m in modules.items()}

    def make(n):
        def hook(mod, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            hs[n].addmm_(x.t(), x)
        return hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in modules.items()]
    return hs, handles


def _gptq_linear(lin: nn.Linear, H: torch.Tensor, mode: str, search: bool) -> nn.Module:
    codes, scales = gptq_quantize(lin.weight.detach(), H, mode, search=search)
    return quant_linear_from_codes(lin, mode, codes, scales)


def calibrate_model(model: nn.Module, mode: str, windows: Windows, *, skip: Skip = None,
                    overrides: Mapping[str, str | None] | None = None, embeddings: bool = True, search: bool = True,
                    tune_steps: int = 0, e2e_steps: int = 0, e2e_windows: Windows | None = None,
                    progress: bool = True, report: dict | None = None) -> dict[str, str]:
    """Quantize ``model`` in place like ``quantize_model(model, mode, embeddings=embeddings, search=search)``,
    with GPTQ rounding calibrated on ``windows`` (``[n, context]`` token ids, :func:`calibration_windows`, or
    a list of the model's inputs per window, e.g. ``{"input_ids", "pixel_values"}``). Returns the same record.
    ``tune_steps``: after GPTQ, tune each decoder layer's rounding and scales against the float layer's output
    for that many steps (:mod:`pocketvlm.quant.blocktune`); 0: GPTQ alone. ``e2e_steps``: then tune every
    quantized linear's group scales for that many steps (one window each) against the float model's
    next-token distribution (:mod:`pocketvlm.quant.e2etune`), on ``e2e_windows`` (default: ``windows``); 0: none.
    ``report``: a dict that gets the end-to-end tuning's held-out KL before and after, and whether it was kept."""
    from tqdm.auto import tqdm

    mm = check_mode(mode)
    windows = _inputs(windows)
    device = windows[0]["input_ids"].device
    plan = {}  # name -> mode, in named_modules order (quantize_model's record order)
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            m = module_mode(name, mod, mm, skip=skip, overrides=overrides, embeddings=embeddings)
            if m is not None:
                plan[name] = m
    tuning = _inputs(windows if e2e_windows is None else e2e_windows) if e2e_steps else None
    targets = e2etune.teacher_targets(model, tuning, progress=progress) if e2e_steps else None  # float model's, first
    record: dict[str, str] = {}
    tables: dict[int, str] = {}  # id(embedding weight) -> embedding name, for tied heads
    for name, m in plan.items():
        mod = model.get_submodule(name)
        if isinstance(mod, nn.Embedding):
            tables[id(mod.weight)] = name
            new = quantize_module(mod, m, search=search)
            _set(model, name, new)
            record[name] = m
    linears = {n: model.get_submodule(n) for n, m in plan.items()
               if formats.parse_mode(m).quantized and isinstance(model.get_submodule(n), nn.Linear)}
    for n in [n for n, m in plan.items() if not formats.parse_mode(m).quantized]:
        mod = model.get_submodule(n)
        if isinstance(mod, nn.Linear) and id(mod.weight) not in tables:
            quantize_module(mod, plan[n])  # q0* override: a cast, nothing to calibrate
            record[n] = plan[n]
    prefix, layers = _decoder_layers(model, linears)
    with _fast_matmuls(device):
        xs, rest = _record_layer_inputs(model, layers, windows)
    tail = {n: m for n, m in linears.items() if not n.startswith(prefix + ".")}
    with tqdm(total=len(layers) + bool(tail), desc=f"calibrating {mm.name}", unit="layer",
              disable=not progress) as bar, torch.no_grad(), _fast_matmuls(device):
        xs_fp = list(xs) if tune_steps else None  # the float model's own stream, for the tuning targets
        for i, layer in enumerate(layers):
            mine = {n: m for n, m in linears.items() if n.startswith(f"{prefix}.{i}.")}
            hs, handles = _hessian_hooks(mine)
            try:
                for x, args in zip(xs, rest):
                    layer(x, *args[i][0], **args[i][1])
            finally:
                for h in handles:
                    h.remove()
            ys = [layer(x, *args[i][0], **args[i][1]) for x, args in zip(xs_fp, rest)] if tune_steps else None
            done = {n: gptq_quantize(lin.weight.detach(), hs[n], plan[n], search=search) for n, lin in mine.items()}
            del hs
            if tune_steps:
                cut = len(f"{prefix}.{i}.")
                tuned = {n[cut:]: Rounded(lin.weight.detach(), *done[n], formats.parse_mode(plan[n]))
                         for n, lin in mine.items()}
                before, after = tune_layer(layer, tuned, xs, [args[i] for args in rest], ys, tune_steps, seed=i)
                bar.set_postfix_str(f"layer {i} error {before:.3g} -> {after:.3g}")
                done = {n: tuned[n[cut:]].result() for n in mine}
                xs_fp = ys
            for n, lin in mine.items():
                _set(model, n, quant_linear_from_codes(lin, plan[n], *done[n]))
                record[n] = plan[n]
            xs = [layer(x, *args[i][0], **args[i][1]) for x, args in zip(xs, rest)]
            bar.update(1)
        if tail:
            hs, handles = _hessian_hooks(tail)
            try:
                for w in windows:
                    model(**w)
            finally:
                for h in handles:
                    h.remove()
            for n, lin in tail.items():
                new = _gptq_linear(lin, hs[n], plan[n], search)
                emb_name = tables.get(id(lin.weight))
                if emb_name is not None and lin.bias is None:  # tied head: one table, now GPTQ-rounded
                    emb = model.get_submodule(emb_name)
                    if isinstance(emb, QuantEmbedding) and record.get(emb_name) == plan[n]:
                        emb.table = new
                        _set(model, n, tied_head(lin, emb))
                        record[n] = TIED_PREFIX + emb_name
                        continue
                _set(model, n, new)
                record[n] = plan[n]
            bar.update(1)
    for name, mod in list(model.named_modules()):  # a tied head left out of the plan shares the table anyway
        if isinstance(mod, nn.Linear) and name not in record and id(mod.weight) in tables:
            head = tied_head(mod, model.get_submodule(tables[id(mod.weight)]))
            if head is not None:
                _set(model, name, head)
                record[name] = TIED_PREFIX + tables[id(mod.weight)]
    if e2e_steps:
        linears.clear()  # the float weights are not needed any more
        mine = tail = None
        before, after = e2etune.tune_scales(model, tuning, targets, e2e_steps, autocast=lambda: _fast_matmuls(device),
                                            progress=progress)
        if report is not None:
            report["e2e_held_out_kl"] = {"before": round(before, 6), "after": round(after, 6), "kept": after < before}
    return record
