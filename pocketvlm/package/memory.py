"""Memory estimate of running a model with pocketvlm: weights + KV cache + activations + vision + runtime.

All terms are bytes for batch 1, computed from the config and quantization mode without loading weights
(the model is built on the meta device with the quantized modules the mode gives):

* ``weights``: every tensor of the quantized state dict at its stored size (codes, scales), float
  tensors at the run dtype; plus ``kernel_cache``: on CPU a quantized layer is repacked for the own kernel
  the first time it runs (``QuantLinear.kernel_extra_bytes``: 4- and 8-bit codes are reordered in place
  beside a copy of the scales; 5-bit codes shrink from 1 to 0.625 bytes/weight; 3-bit layers gain a
  0.5 bytes/weight copy in 64-wide groups).
* ``kv_cache``: the preallocated cache, ``layers x 2 x kv_heads x context x head_dim x kv dtype`` (the
  family's own ``make_cache`` built on meta, so every family's layout counts).
* ``activations``: the largest of (a) a quantized embedding's row lookup, which unpacks the whole
  table (2 bytes per weight), and (b) one decoder layer at ``prefill_chunk_size`` tokens: the residual
  stream, q/k/v, the MLP intermediates, and for quantized layers the dense prefill path's transient
  dequantized weight (float32 codes, scaled copy, bf16 result: ~13 bytes/weight of the largest layer), counted
  when the chunk reaches the dense path (``quant.paths.dense_from_tokens``: 64 rows with the own kernel on
  AVX-512 VNNI, 16 on AVX2).
  Attention scores (``heads x chunk x context`` float32) are counted as PyTorch's math SDPA path
  would hold them. The logits are for the kept positions only (the engine keeps one).
* ``vision``: the encoder at the largest image tiling: ``tiles x tokens x hidden`` states, the MLP
  intermediate, attention scores ``tiles x heads x tokens^2``, the projector output.
* ``repack``: the one-time transient of repacking the largest quantized layer for the CPU kernel
  (unpacked codes plus the packed chunks and their concatenation: ~2 bytes per kernel weight). For a
  model with an untied quantized LM head (Qwen2.5-0.5B's GGUF: 151936 x 896) this is the largest
  single term after the weights - measured, not guessed (tests/test_memory.py). A package stores its 4-bit
  weights in the kernel layout: no repacking for those, and its embedding table is looked up row by row.
* ``runtime``: Python + torch + pocketvlm imports + tokenizer (measured: see ``RUNTIME_BYTES``).
* ``load``: the peak while loading: a VLM's vision tower arrives at the run dtype before it is quantized
  to int8 or cast to bf16, so with a large tower (SigLIP so400m: 1.6 GB in float32, 0.8 GB as int8 + its
  packed copy) loading, not answering, is the peak.

``total`` = max(load, weights + kernel_cache + kv_cache + runtime + max(activations, vision, repack)): the
vision encoder runs before the text prefill, and a layer is repacked at its first single-token call, so
their transients do not overlap.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..loading.core import meta_model as family_on_meta
from ..models import registry

#: Resident set of ``python -c "import torch, pocketvlm.api, pocketvlm.quant, tokenizers"`` (Linux x86-64,
#: torch 2.13 CPU), VmHWM: 229 MiB on the dev VM, 290 MiB on the CI VM (same packages; the difference is
#: the machine), so the constant sits between them (tests/test_memory.py::test_runtime_overhead_is_measured
#: re-measures it, prints the value and allows 15%).
RUNTIME_BYTES = 256 * 1024 ** 2
#: Tokenizer in memory per byte of tokenizer.json (Qwen2.5's 7 MB file: ~60 MB resident, measured).
TOKENIZER_FACTOR = 9
#: Bytes per weight held while the dense prefill path dequantizes one quantized layer (see docstring).
DEQUANT_BYTES_PER_WEIGHT = 13
#: Transient bytes per kernel weight while one layer is repacked for the own CPU kernel.
REPACK_BYTES_PER_WEIGHT = 2
DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def _dtype(d) -> torch.dtype:
    from ..loading import parse_dtype

    return parse_dtype(d)


def mode_record(model: nn.Module, mode: str) -> dict[str, str]:
    """The ``{module: mode}`` record quantize_model(model, mode, embeddings=True) would give, computed
    without quantizing anything (quick on a meta model)."""
    from ..quant import parse_mode, quantize_model

    m = parse_mode(mode)
    if not m.quantized:
        return {}
    names: list[str] = []
    # quantize_model asks ``skip`` about exactly the modules it would quantize with ``mode``: note them, skip all.
    quantize_model(model, m.name, embeddings=True, skip=lambda n, mod: names.append(n) or True)
    record = {n: m.name for n in names}
    mods = dict(model.named_modules())
    emb_by_weight = {id(mods[n].weight): n for n in names if isinstance(mods[n], nn.Embedding)}
    for n in names:  # a head sharing an embedding's table runs that quantized table (TiedQuantHead)
        mod = mods[n]
        if isinstance(mod, nn.Linear) and mod.bias is None and id(mod.weight) in emb_by_weight:
            record[n] = "tied:" + emb_by_weight[id(mod.weight)]
    return record


def meta_model(config: dict, mode: str | None, context_window_size: int | None = None):
    """(model on meta with quantized modules, family, Config) for an HF config dict."""
    from ..quant import build_quantized

    fam = registry.family(config["model_type"])
    cfg = fam.Config.from_dict(config)
    model = family_on_meta(fam, cfg, context_window_size)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    record = (config.get("quantization") or {}).get("modules")
    if record is None:
        record = mode_record(model, mode) if mode else {}
    if record:
        build_quantized(model, record)
    return model, fam, cfg


def weight_bytes(model: nn.Module, dtype: torch.dtype, device: str = "cpu", stored_layout: bool = False
                 ) -> tuple[int, int, int]:
    """(weights, kernel_cache, repack transient) bytes of a (meta or real) model run in ``dtype`` on ``device``.
    ``stored_layout``: a package that stores 4-bit weights in the kernel layout (no repacking for those)."""
    from ..quant import QuantLinear
    from ..quant.vision_fast import VisionInt8Linear

    a = DTYPE_BYTES[dtype]
    scale_keys = set()
    kernel = repack = 0
    for n, m in model.named_modules():
        if isinstance(m, VisionInt8Linear) and device == "cpu":
            kernel += m.qweight.numel()   # the int8 GEMM's packed copy of the codes (built at first call)
        if isinstance(m, QuantLinear):
            scale_keys |= {f"{n}.scales", f"{n}.zeros"}
            if device == "cpu":
                kernel += m.kernel_extra_bytes()
                if not (stored_layout and m.stored_kernel_shape() is not None):
                    repack = max(repack, REPACK_BYTES_PER_WEIGHT * m.kernel_rows * m.kernel_cols)
    seen, total = set(), 0
    for k, t in list(model.state_dict(keep_vars=True).items()):
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        if t.is_floating_point() and k not in scale_keys:
            # the model is cast to the run dtype, except what runs lower already (a bf16 vision tower)
            total += t.numel() * min(a, t.element_size())
        else:
            total += t.numel() * t.element_size()
    return total, kernel, repack


def _text_cfg(cfg):
    return getattr(cfg, "text_config", cfg)


def activation_bytes(model: nn.Module, cfg, dtype: torch.dtype, context: int, chunk: int, device: str = "cpu",
                     stored_layout: bool = False) -> int:
    from ..quant import QuantEmbedding, QuantLinear, TiedQuantHead

    t = _text_cfg(cfg)
    a = DTYPE_BYTES[dtype]
    P = min(chunk, context)
    H, I = t.hidden_size, t.intermediate_size
    nh, nkv, d = t.num_attention_heads, getattr(t, "n_kv_heads", t.num_attention_heads), getattr(t, "dim_head", H // t.num_attention_heads)
    residual = 4 * P * H * a
    qkv = 2 * P * (nh + 2 * nkv) * d * a
    scores = nh * P * context * 4 + P * context  # fp32 scores + bool mask
    mlp = P * I * (3 * a + 2 * 2)  # gate, up, product in dtype; bf16 outputs of the quantized matmuls
    transient = 0
    skip = set()
    for m in model.modules():
        if isinstance(m, QuantEmbedding):
            skip.add(id(m.table))
        elif isinstance(m, TiedQuantHead):
            skip.add(id(m._embedding.table))
    from ..quant.paths import dense_from_tokens

    if P >= dense_from_tokens(device):
        # the LM head sees only the kept positions (one row: the GEMV kernel, no dequantized copy)
        sizes = [m.kernel_rows * m.kernel_cols for n, m in model.named_modules()
                 if isinstance(m, QuantLinear) and id(m) not in skip and "vision_tower" not in n
                 and m.out_features != t.vocab_size]
        transient = DEQUANT_BYTES_PER_WEIGHT * max(sizes, default=0)
    logits = t.vocab_size * (4 + a)
    # A quantized embedding looks rows up by unpacking its whole table first (uint8 codes plus the two
    # nibble planes: 2 bytes per weight, measured); that happens before the layers run.
    # (a table stored in the kernel layout is looked up row by row)
    embed = max((REPACK_BYTES_PER_WEIGHT * m.table.kernel_rows * m.table.kernel_cols
                 for m in model.modules() if isinstance(m, QuantEmbedding)
                 if not (stored_layout and m.table.stored_kernel_shape() is not None)), default=0)
    return max(residual + max(qkv + scores, mlp + transient) + logits, embed)


def vision_bytes(model: nn.Module, cfg, dtype: torch.dtype, tiles: int | None) -> tuple[int, int]:
    """(vision activation bytes, tiles) at ``tiles`` (default: the largest tiling the model allows)."""
    v = getattr(cfg, "vision_config", None)
    if v is None:
        return 0, 0
    if tiles is None:  # anyres: the base tile + the largest grid of image_grid_pinpoints
        pins = getattr(cfg, "image_grid_pinpoints", None)
        tiles = max(p[0] * p[1] for p in pins) // (v.image_size ** 2) + 1 if pins else 1
    a = DTYPE_BYTES[dtype]
    n = (v.image_size // v.patch_size) ** 2
    hv, iv, heads = v.hidden_size, v.intermediate_size, v.num_attention_heads
    text_h = _text_cfg(cfg).hidden_size
    states = tiles * n * hv * a * 4
    mlp = tiles * n * iv * a * 2
    scores = tiles * heads * n * n * 4
    proj = tiles * n * (hv + 2 * text_h) * a
    pixels = tiles * 3 * v.image_size ** 2 * 4
    return states + max(mlp, scores) + proj + pixels, tiles


def estimate_memory(config, mode: str | None = None, context_window_size: int | None = None,
                    prefill_chunk_size: int = 512, *, dtype="float32", device: str = "cpu",
                    image_tiles: int | None = None, tokenizer_bytes: int = 0,
                    runtime_bytes: int = RUNTIME_BYTES, kv_cache_dtype="auto",
                    vision_precision: str = "auto") -> dict[str, int]:
    """Bytes needed to run the model an HF ``config`` dict describes, quantized with ``mode`` (or the
    package's recorded ``"quantization"``), at ``context_window_size`` (default: min(model, 4096)).
    ``tokenizer_bytes``: size of tokenizer.json (its in-memory form is counted ~9x). The KV cache is counted
    in ``kv_cache_dtype`` as ``pocketvlm.load`` picks it (auto: float16 for a quantized float32 model), and a
    VLM's vision tower at ``vision_precision`` as ``pocketvlm.load`` resolves it on ``device`` (int8: one byte
    per weight plus the kernel's packed copy; bf16: two bytes)."""
    from ..quant.vision_fast import apply_vision_precision
    from ..loading import kv_cache_dtype_for

    dtype = _dtype(dtype)
    kv_dtype = kv_cache_dtype_for(kv_cache_dtype, mode or (config.get("quantization") or {}).get("mode"), dtype)
    model, fam, cfg = meta_model(config, mode, context_window_size)
    loading = weight_bytes(model, dtype, device)[0]  # the tower arrives at the run dtype, then is cast/quantized
    if device == "cpu":   # on meta: the same swaps and casts as loading, on shapes only
        apply_vision_precision(model, vision_precision, torch.device(device))
    t = _text_cfg(cfg)
    ctx = int(context_window_size or min(getattr(t, "max_position_embeddings", 4096) or 4096, 4096))
    stored = bool((config.get("quantization") or {}).get("kernel_layout")) and device == "cpu"
    weights, kernel, repack = weight_bytes(model, dtype, device, stored)
    kv = model.make_cache(1, ctx, dtype=kv_dtype, device="meta").nbytes
    act = activation_bytes(model, cfg, dtype, ctx, prefill_chunk_size, device, stored)
    vis, _ = vision_bytes(model, cfg, dtype, image_tiles)
    out = {"weights": weights, "kernel_cache": kernel, "kv_cache": kv, "activations": act, "vision": vis,
           "repack": repack, "runtime": runtime_bytes + TOKENIZER_FACTOR * tokenizer_bytes}
    out["load"] = loading + out["runtime"]
    out["total"] = max(weights + kernel + kv + out["runtime"] + max(act, vis, repack), out["load"])
    return out


def estimate_package(folder, *, config: dict | None = None, context_window_size: int | None = None,
                     prefill_chunk_size: int = 512, dtype="float32", device="cpu", image_tiles=None,
                     vision_precision: str = "auto") -> dict:
    """The estimate for a package folder plus the settings it assumed (stored in manifest.json)."""
    import json

    folder = Path(folder)
    config = config or json.loads((folder / "config.json").read_text())
    tok = folder / "tokenizer.json"
    est = estimate_memory(config, None, context_window_size, prefill_chunk_size, dtype=dtype, device=device,
                          image_tiles=image_tiles, tokenizer_bytes=tok.stat().st_size if tok.exists() else 0,
                          vision_precision=vision_precision)
    return {"bytes": est, "context_window_size": context_window_size, "prefill_chunk_size": prefill_chunk_size,
            "dtype": str(_dtype(dtype)).replace("torch.", ""), "device": device}


def params_estimate(params: float, mode: str, *, runtime_bytes: int = RUNTIME_BYTES) -> dict[str, int]:
    """A size-only estimate: ``params`` weights at the mode's bytes/weight, plus the runtime. No KV cache
    or activations (the architecture is unknown): a lower bound."""
    from ..quant import parse_mode

    w = int(math.ceil(params * parse_mode(mode).bytes_per_weight))
    out = {"weights": w, "kernel_cache": 0, "kv_cache": 0, "activations": 0, "vision": 0, "repack": 0,
           "runtime": runtime_bytes}
    out["total"] = sum(out.values())
    out["load"] = w + runtime_bytes
    return out


def source_config(source) -> tuple[dict, int]:
    """(HF config dict, tokenizer.json bytes or an estimate) of a model source, without reading weights."""
    from .. import loading
    from ..real_models import resolve_source

    kind, path = loading.resolve(resolve_source(source))
    if kind == "hf":
        tok = Path(path) / "tokenizer.json"
        return loading.read_config(Path(path)), tok.stat().st_size if tok.exists() else 0
    reader = loading.gguf_reader(path)
    meta = loading.gguf_metadata(reader)
    arch = meta.get("general.architecture")
    d = registry.gguf_family(arch).gguf_config(meta, arch)
    d.setdefault("tie_word_embeddings", "output.weight" not in {t.name for t in reader.tensors})
    tokens = meta.get("tokenizer.ggml.tokens") or []
    merges = meta.get("tokenizer.ggml.merges") or []
    # tokenizer.json spells each token about twice (vocab + merges); ~2 bytes of JSON per character
    return d, 2 * sum(len(t) + 8 for t in tokens) + sum(len(m) + 6 for m in merges)


def estimate_source(model, mode: str, context_window_size=None, prefill_chunk_size: int = 512,
                    dtype="float32") -> dict:
    """{"model", "quantization", "bytes"} for a package folder (its recorded quantization) or a source
    quantized with ``mode`` (estimated from the config alone)."""
    from ..loading import is_package
    from ..loading.package_files import read_manifest

    if is_package(model):
        m = read_manifest(Path(model))
        est = estimate_package(model, context_window_size=context_window_size,
                               prefill_chunk_size=prefill_chunk_size, dtype=dtype)
        return {"model": str(model), "quantization": m.get("quantization"), "bytes": est["bytes"]}
    config, tok = source_config(model)
    config.pop("quantization", None)
    est = estimate_memory(config, mode, context_window_size, prefill_chunk_size, dtype=dtype, tokenizer_bytes=tok)
    return {"model": str(model), "quantization": mode, "bytes": est}


def estimate_assistant(path, context_window_size=None, prefill_chunk_size: int = 512, dtype="float32", *,
                       runtime_bytes: int = RUNTIME_BYTES) -> dict:
    """{"model", "quantization", "bytes", "parts"} for an assistant definition (a ``.json`` file): each model
    estimated as it loads (its ``vision_load`` / ``chat_load`` quantization and context window, else
    :func:`pocketvlm.load`'s defaults), then combined by the memory policy: ``resident`` holds both in one
    process (their sum, the runtime counted once), ``sequential`` one at a time (the larger of the two).
    ``runtime_bytes``: the Python + torch runtime of the target (default: :data:`RUNTIME_BYTES`)."""
    from ..real_models import default_quantization
    from ..assistant_config import AssistantConfig

    cfg = AssistantConfig.from_file(path)
    parts = {}
    for which in ("vision", "chat"):
        src, opts = getattr(cfg, which), getattr(cfg, f"{which}_load")
        mode = opts.get("quantization") or default_quantization(src)
        ctx = opts.get("context_window_size", context_window_size)
        config, tok = source_config(src)
        config.pop("quantization", None)
        est = estimate_memory(config, "q4f16_1" if mode == "gguf" else mode, ctx,
                              opts.get("prefill_chunk_size", prefill_chunk_size), dtype=opts.get("dtype", dtype),
                              tokenizer_bytes=tok, runtime_bytes=runtime_bytes)
        if mode == "gguf":  # the file's own blocks: as q4f16_1 with the weights at the file's size
            extra = _gguf_bytes(src) - est["weights"]
            est["weights"] += extra
            est["total"] += extra
            est["load"] += extra
        parts[which] = {"model": src, "quantization": mode, "bytes": est}
    v, c = parts["vision"]["bytes"], parts["chat"]["bytes"]
    if cfg.memory == "resident":
        total = {k: v[k] + c[k] for k in v}
        total["runtime"] -= runtime_bytes  # one process: one Python + torch runtime
        total.update({k: max(v[k], c[k]) for k in ("activations", "vision", "repack")})
        total["load"] = max(v["load"] + c["weights"], c["load"] + v["weights"]) - runtime_bytes
        # the models run one after the other: their working sets (prefill, vision, repack) never coincide
        total["total"] = v["total"] + c["total"] - runtime_bytes - min(transient_bytes(v), transient_bytes(c))
    else:
        total = max(v, c, key=lambda b: b["total"])
    return {"model": f"{path} ({cfg.memory})", "quantization": "/".join(str(p["quantization"]) for p in parts.values()),
            "bytes": total, "parts": parts, "memory": cfg.memory}


def transient_bytes(est: dict) -> int:
    """The part of an estimate only there for a while: the largest working set while the model runs, or the
    load peak's excess (a vision tower loaded at the run dtype before its cast to int8/bf16)."""
    return est["total"] - (est["weights"] + est["kernel_cache"] + est["kv_cache"] + est["runtime"])


def _gguf_bytes(source) -> int:
    from .. import loading
    from ..real_models import resolve_source

    return Path(loading.resolve(resolve_source(source))[1]).stat().st_size
