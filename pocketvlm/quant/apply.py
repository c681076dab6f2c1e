"""Quantizing a built model (a layer swap, as gpt-fast does) and rebuilding one from its record.

Policy (``quantize_model`` defaults):
  * ``nn.Linear`` layers are quantized with ``mode``; ``nn.Embedding`` only with ``embeddings=True``.
  * Modules whose name contains ``vision_tower`` stay unquantized: the vision encoder runs once per
    image (compute-bound, not bandwidth-bound) and is quality-sensitive.
  * The projector (``multi_modal_projector`` / ``mm_projector``) also stays in the activation dtype:
    it is tiny (a few MB) and every image token passes through it.
  * ``overrides`` win over both: ``{"*vision_tower*": "q8f16_1"}`` quantizes the vision tower anyway;
    a value of ``None``/"none" keeps a matching module unquantized.
  * A tied LM head (``lm_head.weight is embed_tokens.weight``) becomes a :class:`TiedQuantHead` over the
    quantized embedding when embeddings are quantized (one copy of the table); otherwise it is
    quantized on its own (a second, low-bit copy: decode reads it every token).

Patterns are ``fnmatch`` globs on the module name (``"*vision_tower*"``, ``"model.layers.0.*"``).
The returned record ``{module name: mode}`` is what config.json stores; :func:`build_quantized` turns
a freshly built model into the matching empty quantized skeleton so ``load_state_dict`` (strict) on
a saved quantized state dict works without requantizing.
"""
from __future__ import annotations

import fnmatch
import warnings
from typing import Callable, Iterable, Mapping

import torch
from gguf import GGMLQuantizationType as T
from torch import nn

from ..errors import QuantizationError
from . import formats, gguf_blocks
from .embedding import QuantEmbedding
from .linear import Int3Linear, Int4Linear, Int5Linear, Int8Linear, QuantLinear, quant_linear_from_float

DEFAULT_SKIP = ("*vision_tower*", "*multi_modal_projector*", "*mm_projector*")
#: Storage of GGUF Q4_0/Q4_1/Q4_K kept 4-bit: fp32 scale and zero per 32 weights.
GGUF_INT4 = "q4f32_gguf"
#: Storage of GGUF Q5_0 (exact): 5-bit codes, fp16 scale per 32 weights (saved as int8 codes, run as 5-bit).
GGUF_INT5 = "q5f16_gguf"
TIED_PREFIX = "tied:"

Skip = Callable[[str, nn.Module], bool] | Iterable[str] | None


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _mode_for(name, module, mode, skip, overrides) -> str | None:
    for pattern, m in (overrides or {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            return None if m in (None, "none") else formats.parse_mode(m).name
    if _matches(name, DEFAULT_SKIP):
        return None
    if callable(skip):
        if skip(name, module):
            return None
    elif skip is not None and _matches(name, [skip] if isinstance(skip, str) else skip):
        return None
    return mode.name


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _embedding_table(emb: nn.Embedding) -> nn.Linear:
    lin = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, device="meta")
    lin.weight = emb.weight
    return lin


def module_mode(name: str, module: nn.Module, mode: str | formats.QuantMode, *, skip: Skip = None,
                overrides: Mapping[str, str | None] | None = None, embeddings: bool = False) -> str | None:
    """The mode :func:`quantize_model` gives the module called ``name`` (the policy in the module
    docstring), or ``None`` to leave it as it is. A tied LM head is not decided here: see :func:`tied_head`."""
    if isinstance(module, nn.Embedding):
        if not embeddings:
            return None
    elif not isinstance(module, nn.Linear):
        return None
    return _mode_for(name, module, formats.parse_mode(mode), skip, overrides)


def quantize_module(module: nn.Module, mode: str, *, search: bool = False) -> nn.Module:
    """One ``nn.Linear`` / ``nn.Embedding`` in ``mode``: its quantized replacement (a :class:`QuantLinear`,
    or a :class:`QuantEmbedding` over one), or for ``q0*`` modes the module itself, cast in place.
    ``search``: each group's scale minimises its error (:mod:`pocketvlm.quant.scales`) instead of RTN's."""
    mm = formats.parse_mode(mode)
    if not mm.quantized:
        return module.to(mm.torch_dtype)
    if isinstance(module, nn.Embedding):
        return QuantEmbedding(_quantize_linear(_embedding_table(module), mm, search), dtype=module.weight.dtype)
    return _quantize_linear(module, mm, search)


#: Weights with more than this many elements are quantized a slice of rows at a time, into the final module:
#: ``quant_linear_from_float`` holds a byte of unpacked codes per weight and then the packed copy, which for
#: a 151936 x 896 embedding table was 200 MB of the peak of a (streamed) quantized load.
_SLICE_WEIGHTS = 1 << 22


def _quantize_linear(linear: nn.Linear, mode: formats.QuantMode, search: bool = False) -> QuantLinear:
    """``quant_linear_from_float``, slice by slice of rows for big weights (rows are quantized independently
    and every stored tensor is row-major in the output dim, so the module is the same bit for bit)."""
    w = linear.weight.detach()
    out_f, in_f = w.shape
    rows = max(1, _SLICE_WEIGHTS // max(1, in_f))
    if out_f <= rows:
        return quant_linear_from_float(linear, mode, search=search)
    m = _empty_quant_linear(in_f, out_f, linear.bias is not None, mode.name, w.device, w.dtype)
    for r in range(0, out_f, rows):
        part = nn.Linear(in_f, min(rows, out_f - r), bias=False, device="meta")
        part.weight = nn.Parameter(w[r:r + rows], requires_grad=False)
        for name, buf in quant_linear_from_float(part, mode, search=search).named_buffers():
            getattr(m, name)[r:r + rows] = buf
    if linear.bias is not None:
        m.bias.data.copy_(linear.bias.detach())
    return m


def tied_head(linear: nn.Module, embedding: nn.Module) -> nn.Module | None:
    """The module a bias-free LM head tied to ``embedding`` becomes once that embedding is quantized (one
    copy of the table), or ``None`` when the head is to be treated as a Linear of its own."""
    if isinstance(embedding, QuantEmbedding) and isinstance(linear, nn.Linear) and linear.bias is None:
        return embedding.as_lm_head()
    return None


def quantize_model(model: nn.Module, mode: str, *, skip: Skip = None,
                   overrides: Mapping[str, str | None] | None = None, embeddings: bool = False,
                   search: bool = False) -> dict[str, str]:
    """Swap the model's ``nn.Linear`` (and, with ``embeddings=True``, ``nn.Embedding``) layers for
    quantized ones in place. Returns ``{module name: mode}`` for every module changed; ``q0*`` modes
    only cast weights to their dtype. ``search``: error-minimising scales (see :func:`quantize_module`)."""
    mode = formats.parse_mode(mode)
    record: dict[str, str] = {}
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    # embeddings first, so a tied head can find its table
    targets.sort(key=lambda nm: not isinstance(nm[1], nn.Embedding))
    embedded: dict[int, tuple[str, nn.Module]] = {}  # id(weight) -> (name, quantized embedding)
    for name, mod in targets:
        if isinstance(mod, nn.Linear) and id(mod.weight) in embedded:
            emb_name, emb = embedded[id(mod.weight)]
            head = tied_head(mod, emb)
            if head is not None:
                _set(model, name, head)
                record[name] = TIED_PREFIX + emb_name
                continue
        m = module_mode(name, mod, mode, skip=skip, overrides=overrides, embeddings=embeddings)
        if m is None:
            continue
        new = quantize_module(mod, m, search=search)
        if new is not mod:
            _set(model, name, new)
            if isinstance(mod, nn.Embedding):
                embedded[id(mod.weight)] = (name, new)
        record[name] = m
    return record


def _empty_quant_linear(in_f: int, out_f: int, bias: bool, mode: str, device, dtype) -> QuantLinear:
    if mode == GGUF_INT4:
        return Int4Linear(in_f, out_f, bias, mode=mode, affine=True, scale_dtype=torch.float32, device=device, dtype=dtype)
    if mode == GGUF_INT5:
        return Int5Linear(in_f, out_f, bias, mode=mode, device=device, dtype=dtype)
    mm = formats.parse_mode(mode)
    cls = {4: Int4Linear, 8: Int8Linear, 3: Int3Linear}[mm.bits]
    return cls(in_f, out_f, bias, mode=mm.name, group_size=mm.group_size, scale_dtype=mm.torch_scale_dtype,
               device=device, dtype=dtype)


def _is_quantized_mode(mode: str) -> bool:
    return mode in (GGUF_INT4, GGUF_INT5) or formats.parse_mode(mode).quantized


def build_quantized(model: nn.Module, record: Mapping[str, str]) -> nn.Module:
    """Replace the modules named in ``record`` (from :func:`quantize_model` or GGUF loading) by empty
    quantized modules of the right shapes, ready for ``load_state_dict`` of a saved quantized model.
    Works on a model built on the meta device (use ``load_state_dict(..., assign=True)`` then)."""
    tied = {}
    for name, mode in sorted(record.items(), key=lambda kv: kv[1].startswith(TIED_PREFIX)):
        try:
            mod = model.get_submodule(name)
        except AttributeError as e:
            raise QuantizationError(f"quantization record names {name!r}, which the model does not have") from e
        if mode.startswith(TIED_PREFIX):
            emb = tied.get(mode[len(TIED_PREFIX):])
            if emb is None:
                raise QuantizationError(f"{name} is tied to {mode[len(TIED_PREFIX):]!r}, which is not a quantized embedding")
            _set(model, name, emb.as_lm_head())
            continue
        if not isinstance(mod, (nn.Linear, nn.Embedding)):
            raise QuantizationError(f"{name} is a {type(mod).__name__}; only Linear and Embedding can be quantized")
        if not _is_quantized_mode(mode):
            mod.to(formats.parse_mode(mode).torch_dtype)
            continue
        w = mod.weight
        if isinstance(mod, nn.Embedding):
            table = _empty_quant_linear(mod.embedding_dim, mod.num_embeddings, False, mode, w.device, w.dtype)
            new = QuantEmbedding(table, dtype=w.dtype)
            tied[name] = new
        else:
            new = _empty_quant_linear(mod.in_features, mod.out_features, mod.bias is not None, mode, w.device, w.dtype)
        _set(model, name, new)
    return model


# ----- GGUF tensors -----------------------------------------------------------------------------------

_EXACT_INT8 = (T.Q8_0, T.Q5_0)
_INT4 = (T.Q4_0, T.Q4_1, T.Q4_K)


def gguf_linear(data, ggml_type, gguf_shape, *, bias: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32, name: str = "") -> tuple[nn.Module, str]:
    """One GGUF weight (``tensor.data``, ``tensor.tensor_type``, ``tensor.shape`` from ``GGUFReader``)
    -> ``(module, mode)`` with the ``nn.Linear`` call contract:

    * Q4_0/Q4_1/Q4_K -> :class:`Int4Linear` (mode ``q4f32_gguf``), exact codes on the 4-bit kernel.
    * Q8_0 -> :class:`Int8Linear` (mode ``q8f16_1`` storage: int8 codes, fp16 scales), exact.
    * Q5_0 -> :class:`Int5Linear` (mode ``q5f16_gguf``), exact: the 8-bit storage, run as 5-bit codes
      (5.5 bits per weight, as in the file) on the CPU kernel.
    * other quantized types (Q6_K, Q5_1, Q2_K, Q3_K, Q5_K) -> dequantized and requantized to
      q8f16_1 (warns: not bit-exact, error below half an 8-bit step per 32-weight group).
    * F32/F16/BF16 -> ``nn.Linear`` in ``dtype`` (mode ``q0...`` of that dtype).
    """
    t = gguf_blocks._as_type(ggml_type)
    shape = gguf_blocks.torch_shape(gguf_shape)
    if len(shape) != 2:
        raise QuantizationError(f"{name or 'GGUF tensor'}: a Linear weight must be 2-D, got shape {shape}")
    out_f, in_f = shape
    if bias is not None and bias.shape != (out_f,):
        raise QuantizationError(f"{name}: bias shape {tuple(bias.shape)} does not match out_features {out_f}")
    if t in _INT4:
        codes, scale, zero = gguf_blocks.int4_codes(data, t, shape)
        m = Int4Linear(in_f, out_f, bias is not None, mode=GGUF_INT4, affine=True, scale_dtype=torch.float32, dtype=dtype)
        m.qweight.copy_(formats.pack_4bit(codes))
        m.scales.copy_(scale)
        m.zeros.copy_(zero)
        mode = GGUF_INT4
    elif t in _EXACT_INT8:
        codes, scale = gguf_blocks.int8_codes(data, t, shape)
        mode = GGUF_INT5 if t is T.Q5_0 else "q8f16_1"
        m = (Int5Linear if t is T.Q5_0 else Int8Linear)(in_f, out_f, bias is not None, mode=mode, dtype=dtype)
        m.qweight.copy_(codes)
        m.scales.copy_(scale.to(torch.float16))  # came from fp16 fields: lossless
    elif t in (T.F32, T.F16, T.BF16):
        m = nn.Linear(in_f, out_f, bias is not None, dtype=dtype)
        with torch.no_grad():
            m.weight.copy_(gguf_blocks.dequantize_gguf(data, t, shape, dtype))
        mode = {torch.float32: "q0f32", torch.float16: "q0f16", torch.bfloat16: "q0bf16"}[dtype]
    else:
        warnings.warn(f"{name or 'tensor'}: GGUF {t.name} has no low-bit kernel here; requantized to "
                      "q8f16_1 (8-bit, group 32) - close to but not bit-identical with the file", stacklevel=2)
        lin = nn.Linear(in_f, out_f, bias=False, device="meta")
        lin.weight = nn.Parameter(gguf_blocks.dequantize_gguf(data, t, shape), requires_grad=False)
        m = quant_linear_from_float(lin, "q8f16_1")
        mode = "q8f16_1"
    if bias is not None:
        m.bias.data.copy_(bias.to(m.bias.dtype))
    return m, mode


def gguf_embedding(data, ggml_type, gguf_shape, *, dtype: torch.dtype = torch.float32,
                   name: str = "") -> tuple[nn.Module, str]:
    """A GGUF token-embedding table ``[vocab, dim]`` -> ``(QuantEmbedding or nn.Embedding, mode)``;
    the same rules as :func:`gguf_linear`. For a tied LM head use ``module.as_lm_head()``."""
    table, mode = gguf_linear(data, ggml_type, gguf_shape, dtype=dtype, name=name)
    if isinstance(table, QuantLinear):
        return QuantEmbedding(table, dtype=dtype), mode
    return nn.Embedding.from_pretrained(table.weight.detach(), freeze=True), mode
