"""``convert``: any source pocketvlm loads (HF folder, hub id, GGUF, built-in name) -> a package folder,
read back by :func:`pocketvlm.loading.load_package` (a package folder -> :class:`pocketvlm.loading.Loaded`
without requantizing).

Conversion loads the source in float32 (GGUF tensors dequantized), swaps the layers for quantized ones
with :func:`pocketvlm.quant.quantize_model` (embeddings included, as MLC does; the vision tower and
projector stay in float, see :mod:`pocketvlm.quant.apply`), and writes the quantized state dict. Tensors
that stay in float are stored in the mode's dtype (``q4f16_1`` -> float16) unless ``dtype`` says
otherwise; loading casts them to the dtype asked for.

``config.json`` is the source's HF config (for GGUF: the config derived from its metadata) plus
``"quantization": {"mode", "bits", "group_size", "scale_dtype", "stored_dtype", "modules": {name: mode},
"unquantized": [...], "tied": {key: key}}``; ``modules`` is quantize_model's record, so loading rebuilds
exactly those modules (:func:`pocketvlm.quant.build_quantized`) and loads the saved tensors strictly.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from .. import loading
from ..errors import PackageError
from ..models.base import is_vlm
from ..loading import package_files as files
from ..loading.package import is_package, scale_keys
from ..version import __version__

#: Files a Hugging Face folder keeps its tokenizer and generation defaults in (copied as they are).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json", "tokenizer.model",
                   "vocab.json", "merges.txt")


def _mode(name):
    from ..quant import parse_mode

    return parse_mode(name)


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PackageError(f"output {out} exists and is not a folder; pick another -o path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PackageError(f"output folder {out} is not empty; pass --overwrite (overwrite=True) to replace it "
                               "or pick another -o path")
        if out.resolve() == Path.cwd().resolve() or out.resolve() == Path.home().resolve():
            raise PackageError(f"refusing to clear {out}; convert into a dedicated folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def float_sizes(model: nn.Module) -> dict[str, int]:
    """Weight element count of every Linear/Embedding (before quantization)."""
    return {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, vision) unique parameter counts of a float model."""
    seen, total, vision = set(), 0, 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if "vision_tower" in name:
            vision += p.numel()
    return total, vision


def quantize_with_progress(model: nn.Module, mode: str, progress: bool = True, search: bool = True) -> dict[str, str]:
    """quantize_model (error-minimising scales unless ``search=False``) with a tqdm bar ticking once per module."""
    from tqdm.auto import tqdm

    from ..quant import quantize_model

    targets = sum(isinstance(m, (nn.Linear, nn.Embedding)) for m in model.modules())
    with tqdm(total=targets, desc=f"quantizing to {mode}", unit="layer", disable=not progress) as bar:
        def tick(name, module):
            bar.update(1)
            return False  # never skip: the bar only watches

        record = quantize_model(model, mode, embeddings=True, skip=tick, search=search)
        bar.update(bar.total - bar.n)
    return record


def state_to_save(model: nn.Module, store_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, tied) : floats cast to ``store_dtype`` (scales excepted); a tensor shared by two keys is
    saved once and ``tied`` maps the dropped key to the kept one."""
    keep = scale_keys(model)
    out, tied, seen = {}, {}, {}
    for k, v in model.state_dict(keep_vars=True).items():
        if v is None:
            continue
        if id(v) in seen:
            tied[k] = seen[id(v)]
            continue
        seen[id(v)] = k
        t = v.detach()
        if t.is_floating_point() and k not in keep:
            t = t.to(store_dtype)
        out[k] = t.contiguous()
    return out, tied


# --- tokenizer ----------------------------------------------------------------------------------------

def save_tokenizer(loaded: loading.Loaded, out: Path) -> list[str]:
    """Copy an HF folder's tokenizer files; for GGUF, save the rebuilt tokenizer as tokenizer.json +
    tokenizer_config.json (+ generation_config.json for extra end-of-turn ids)."""
    if loaded.kind != "gguf":
        written = []
        for name in TOKENIZER_FILES:
            src = Path(loaded.path) / name
            if src.is_file():
                shutil.copyfile(src, out / name)
                written.append(name)
        return written
    tok = loading.load_tokenizer(loaded)
    if hasattr(tok, "save"):  # the tokenizer module's own writer, when it has one
        tok.save(out)
        return [n for n in TOKENIZER_FILES if (out / n).is_file()]
    # Thin adapter: Tokenizer has no save(); its backend (tokenizers.Tokenizer) and public special-token
    # facts are enough to write what Tokenizer.from_folder reads back.
    tok.backend.save(str(out / "tokenizer.json"))
    cfg = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
           "unk_token": tok.unk_token, "add_bos_token": tok.add_bos_token, "add_eos_token": False,
           "tokenizer_class": "PreTrainedTokenizerFast"}
    templates = getattr(tok, "chat_templates", None) or ({"default": tok.chat_template} if tok.chat_template else {})
    if set(templates) == {"default"}:
        cfg["chat_template"] = templates["default"]
    elif templates:
        cfg["chat_template"] = [{"name": k, "template": v} for k, v in templates.items()]
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    written = ["tokenizer.json", "tokenizer_config.json"]
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": sorted(tok.eos_token_ids)}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return written + ["generation_config.json"]


# --- convert ------------------------------------------------------------------------------------------

def convert(source, quantization: str, output, *, overwrite: bool = False, dtype: str | None = None,
            shard_bytes: int = files.SHARD_BYTES, context_window_size: int | None = None,
            prefill_chunk_size: int = 512, progress: bool = True, scales: str = "search",
            calibrate: str | Path | bool | None = None, calibration_windows: int | None = None,
            tune_steps: int | None = None, e2e_steps: int | None = None, mmproj: str | Path | None = None) -> Path:
    """Convert ``source`` to a package folder ``output`` quantized with MLC mode ``quantization``.
    Returns the folder. ``dtype``: the dtype of tensors kept in float (default: the mode's).

    ``scales``: ``"search"`` (default) picks each group's scale by minimising its error, ``"rtn"`` is MLC's
    plain ``max|w| / offset``; same format either way. ``calibrate``: GPTQ rounding
    (:mod:`pocketvlm.quant.calibrate`) on a text file, or ``True`` for the default text that ships with
    Python; ``calibration_windows`` windows of 512 tokens from its start (default 64). For a vision-language
    model, ``calibrate`` may be a LLaVA-format ``.json``/``.jsonl`` of conversations with images
    (``calibration_windows``: conversations, default 128). ``tune_steps``: after GPTQ, steps of block-wise
    tuning of each decoder layer (:mod:`pocketvlm.quant.blocktune`; default its ``STEPS``, 0 for GPTQ alone);
    ``e2e_steps``: then steps of end-to-end tuning of the group scales (:mod:`pocketvlm.quant.e2etune`).
    ``mmproj``: with a ``.gguf`` source, llama.cpp's vision file that makes it a VLM
    (:mod:`pocketvlm.loading.mmproj`)."""
    mode = _mode(quantization)  # unknown names fail here, before anything is loaded or written
    if scales not in ("search", "rtn"):
        raise PackageError(f"scales must be 'search' or 'rtn', got {scales!r}")
    text = None
    if calibrate:
        from . import calibration

        text = calibration.prepare(mode, calibrate, calibration_windows, tune_steps, e2e_steps)
    store_dtype = loading.parse_dtype(dtype or mode.dtype)
    out = Path(output).expanduser()
    if is_package(source):
        raise PackageError(f"{source} is already a pocketvlm package ({files.MANIFEST}); convert its original source")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        check_output(out, overwrite)  # fail before the (slow) load
    from ..real_models import resolve_source

    if text is not None:
        calibration.check_source(source, text, mmproj)
        calibration.check_memory(source, mode, text)
    loaded = loading.load(resolve_source(source), dtype=torch.float32, mmproj=mmproj)
    model = loaded.model
    sizes = float_sizes(model)
    total, vision = count_parameters(model)
    if text is not None:
        record, calibrated = calibration.run(loaded, mode, text, search=scales == "search", progress=progress)
    elif mode.quantized:
        record = quantize_with_progress(model, mode.name, progress, search=scales == "search")
    else:
        model.to(mode.torch_dtype)
        record = {}
    quantized_params = sum(sizes[n] for n, m in record.items() if not m.startswith("tied:") and _mode(m).quantized)
    from ..quant.linear import KERNEL_LAYOUT, kernel_layout_state

    with kernel_layout_state():  # 4-bit weights in the layout the CPU kernel reads: no repacking at load
        tensors, tied = state_to_save(model, store_dtype)

    check_output(out, overwrite)
    from tqdm.auto import tqdm

    written = []
    with tqdm(total=1, desc="writing weights", disable=not progress) as bar:
        written += files.write_shards(tensors, out, shard_bytes)
        bar.update(1)
    del tensors
    config = dict(loaded.config_dict)
    linear_like = [n for n in sizes]
    config["quantization"] = {
        "mode": mode.name, "bits": mode.bits, "group_size": mode.group_size, "scale_dtype": mode.scale_dtype,
        "stored_dtype": str(store_dtype).replace("torch.", ""), "modules": record,
        "unquantized": sorted(n for n in linear_like if n not in record), "tied": tied,
        "quantizer": "pocketvlm.quant.quantize_model(embeddings=True)",
        "scales": scales if mode.quantized else None,
        "calibration": calibrated if text is not None else None,
        "kernel_layout": KERNEL_LAYOUT,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, default=_json_default))
    written.append("config.json")
    written += save_tokenizer(loaded, out)
    if is_vlm(model):
        d = loaded.image_processor  # an mmproj file's settings
        if d is None and loaded.kind != "gguf":
            d = loading.image_processor_dict(Path(loaded.path))
        if d is not None:
            (out / "preprocessor_config.json").write_text(json.dumps(d, indent=2))
            written.append("preprocessor_config.json")
    del loaded, model
    write_manifest(out, written, source=str(source), mode=mode.name, total=total, vision=vision,
                   quantized=quantized_params, context_window_size=context_window_size,
                   prefill_chunk_size=prefill_chunk_size)
    return out


def _json_default(o):
    if isinstance(o, (set, tuple)):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def write_manifest(out: Path, names: list[str], *, source: str, mode: str, total: int, vision: int, quantized: int,
                   context_window_size: int | None, prefill_chunk_size: int) -> dict:
    from .memory import estimate_package

    entries = {n: files.file_entry(out / n) for n in dict.fromkeys(names)}
    config = json.loads((out / "config.json").read_text())
    manifest = {
        "format": files.FORMAT, "format_version": files.FORMAT_VERSION, "pocketvlm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": source,
        "model_type": config.get("model_type"), "quantization": mode,
        "parameters": {"total": total, "quantized": quantized, "vision": vision},
        "bytes_on_disk": sum(e["bytes"] for e in entries.values()),
        "files": entries,
    }
    manifest["memory"] = estimate_package(out, config=config, context_window_size=context_window_size,
                                          prefill_chunk_size=prefill_chunk_size)
    (out / files.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
