"""One loading pipeline for every family and source.

source -> (HF folder | GGUF file) -> config dict -> family module (registry) -> build on the meta device
-> ``sanitize(weights)`` -> strict load that checks every key and shape -> tie weights -> device/dtype.

Sources: a local Hugging Face folder (``config.json`` + single or sharded ``*.safetensors``, read through
safetensors' mmap, never pickle), a Hugging Face repo id (downloaded with ``huggingface_hub``), a llama.cpp
``.gguf`` file, or the name of a built-in real model (see :mod:`pocketvlm.real_models`).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, CorruptWeightsError, ModelNotFoundError, PocketVLMError
from .models import registry

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


@dataclass
class Loaded:
    """What a load returns: the module, its config, the family module, and where it came from."""

    model: nn.Module
    config: Any
    family: Any
    source: str
    kind: str  # "hf" or "gguf"
    path: Path
    config_dict: dict = field(default_factory=dict)
    gguf_metadata: dict | None = None
    quantization: dict | None = None  # {"mode": name, "modules": {module name: mode}} when quantized


# --- resolving a source ---------------------------------------------------------------------------

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(source: str | os.PathLike) -> tuple[str, Path]:
    """("hf", folder) or ("gguf", file) for a path, a built-in real model name, or a hub repo id."""
    from .real_models import resolve_real_model

    s = str(source)
    p = Path(s).expanduser()
    if p.is_dir():
        if (p / "config.json").exists():
            return "hf", p
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise ModelNotFoundError(f"{p} has no config.json: not a Hugging Face model folder")
    if p.is_file():
        if p.suffix == ".gguf" or _is_gguf(p):
            return "gguf", p
        if p.name == "config.json":
            return "hf", p.parent
        raise ModelNotFoundError(f"{p} is neither a model folder nor a .gguf file")
    real = resolve_real_model(s)
    if real is not None:
        return "gguf", real
    if _REPO_ID.match(s) and not s.startswith((".", "/", "~")):
        return "hf", download(s)
    raise ModelNotFoundError(f"model {s!r} not found: no such file or folder, and not a Hugging Face repo id")


def _is_gguf(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def download(repo_id: str, revision: str | None = None) -> Path:
    """Download (or reuse from the HF cache) the files pocketvlm needs from a Hugging Face repo."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - dependency is declared
        raise ModelNotFoundError("huggingface_hub is required to download models") from e
    patterns = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except LocalEntryNotFoundError as e:
        raise ModelNotFoundError(
            f"cannot download {repo_id!r}: the Hugging Face hub is unreachable (offline?) and the model is not "
            "in the local cache; pass a local folder or .gguf file instead") from e
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise ModelNotFoundError(f"cannot download {repo_id!r} from the Hugging Face hub: {e}") from e
    return Path(path)


# --- Hugging Face folders -----------------------------------------------------------------------------

def read_config(folder: Path) -> dict:
    f = folder / "config.json"
    if not f.exists():
        raise ModelNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f} is not valid JSON: {e}") from e
    if not isinstance(d, dict) or "model_type" not in d:
        raise ConfigError(f"{f} has no model_type")
    return d


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CorruptWeightsError(f"shards listed in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{folder} has no *.safetensors weights (pickled .bin weights are not loaded)")
    return files


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptWeightsError(f"{f} is not a valid safetensors file (truncated or corrupt?): {e}") from e
    return weights


def load_hf(folder: Path, *, device="cpu", dtype=torch.float32, max_seq_len: int | None = None) -> Loaded:
    d = read_config(folder)
    fam = registry.family(d["model_type"])
    cfg = fam.Config.from_dict(d)
    weights = fam.sanitize(read_safetensors(safetensors_files(folder)), cfg)
    model = build(fam, cfg, weights, device=device, dtype=dtype, max_seq_len=max_seq_len)
    return Loaded(model, cfg, fam, str(folder), "hf", folder, d)


# --- GGUF ---------------------------------------------------------------------------------------------

def gguf_reader(path: Path):
    """The parsed GGUF file (:class:`pocketvlm.gguf_file.GGUFFile`: ``metadata`` and ``tensors``)."""
    from .gguf_file import read_gguf

    return read_gguf(path)


def gguf_metadata(reader) -> dict[str, Any]:
    return reader.metadata


def gguf_tensor_to_torch(t) -> torch.Tensor:
    """Dequantize one GGUF tensor to fp32 in PyTorch's [out, in] layout."""
    from .quant.gguf_blocks import dequantize_gguf, torch_shape

    return dequantize_gguf(t.data, t.tensor_type, torch_shape(t.shape))


def map_gguf_names(names, table: dict[str, str]) -> dict[str, str]:
    """GGUF tensor names -> HF names through a family's table with ``{i}`` layer placeholders."""
    patterns = [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), h) for g, h in table.items()]
    out = {}
    for n in names:
        for rx, h in patterns:
            m = rx.match(n)
            if m:
                out[n] = h.replace("{i}", m.group(1)) if m.groups() else h
                break
        else:
            raise CorruptWeightsError(f"GGUF tensor {n!r} has no counterpart in pocketvlm's model")
    return out


def load_gguf(path: Path, *, device="cpu", dtype=torch.float32, max_seq_len: int | None = None,
              tensor_loader=None, keep_quantized: bool = False) -> Loaded:
    """Load a llama.cpp GGUF: config and tokenizer from its metadata, weights dequantized; with
    ``keep_quantized`` the quantized tensors then become quantized modules (``quantization="gguf"``)."""
    reader = gguf_reader(path)
    meta = reader.metadata
    arch = meta.get("general.architecture")
    fam = registry.gguf_family(arch)
    d = fam.gguf_config(meta, arch)
    names = [t.name for t in reader.tensors]
    d.setdefault("tie_word_embeddings", "output.weight" not in names)
    cfg = fam.Config.from_dict(d)
    hf_names = map_gguf_names(names, fam.GGUF_TENSORS)
    load = tensor_loader or gguf_tensor_to_torch
    try:
        weights = {hf_names[t.name]: load(t) for t in reader.tensors}
    except PocketVLMError:
        raise
    except Exception as e:
        raise CorruptWeightsError(f"{path}: cannot read tensor data (truncated or corrupt?): {e}") from e
    weights = fam.gguf_sanitize(weights, cfg)
    model = build(fam, cfg, weights, device=device, dtype=dtype, max_seq_len=max_seq_len)
    loaded = Loaded(model, cfg, fam, str(path), "gguf", path, d, meta)
    if keep_quantized:
        loaded.quantization = {"mode": "gguf", "modules": keep_gguf_quantized(model, reader, hf_names, cfg, dtype)}
    return loaded


def _unpermuted_rows(fam, hf_name: str, rows: int, cfg):
    """Row order that undoes llama.cpp's q/k permutation for families whose GGUF converter applies it."""
    unpermute = getattr(fam, "unpermute_qk", None)
    if unpermute is None or not fam.gguf_sanitize.__module__.endswith(".llama"):
        return None
    if hf_name.endswith("q_proj.weight"):
        heads = cfg.num_attention_heads
    elif hf_name.endswith("k_proj.weight"):
        heads = cfg.n_kv_heads
    else:
        return None
    return unpermute(torch.arange(rows)[:, None], heads)[:, 0].numpy()


def _gguf_module(mod, data, t, dtype):
    from .quant import gguf_embedding, gguf_linear

    if isinstance(mod, nn.Embedding):
        return gguf_embedding(data, t.tensor_type, t.shape, dtype=dtype, name=t.name)
    if isinstance(mod, nn.Linear):
        return gguf_linear(data, t.tensor_type, t.shape, bias=mod.bias, dtype=dtype, name=t.name)
    return None, None


def keep_gguf_quantized(model: nn.Module, reader, hf_names: dict, cfg, dtype) -> dict[str, str]:
    """Swap the dequantized linears/embeddings of a GGUF-loaded model for modules that keep the file's
    quantized blocks (Q4_0/Q4_1/Q4_K on the int4 kernel, Q8_0/Q5_0 as exact 8-bit, other types converted
    to q8f16_1 with a warning). Returns ``{module name: mode}``."""
    import numpy as np

    from .quant.linear import QuantEmbedding

    import gguf as _gguf

    float_types = {_gguf.GGMLQuantizationType.F32, _gguf.GGMLQuantizationType.F16, _gguf.GGMLQuantizationType.BF16}
    import warnings

    fam = registry.gguf_family(reader.metadata.get("general.architecture"))
    modules = dict(model.named_modules())
    record = {}
    emb_name = None
    converted: dict[str, int] = {}
    for t in reader.tensors:
        hf = hf_names[t.name]
        mod_name = hf.rsplit(".", 1)[0]
        if not hf.endswith(".weight") or t.tensor_type in float_types or mod_name not in modules:
            continue
        mod = modules[mod_name]
        data = t.data
        order = _unpermuted_rows(fam, hf, data.shape[0], cfg)
        if order is not None:
            data = np.ascontiguousarray(data[order])
        parent, _, child = mod_name.rpartition(".")
        with warnings.catch_warnings(record=True) as caught:  # one summary below, not one line per tensor
            warnings.simplefilter("always")
            new, mode = _gguf_module(mod, data, t, dtype)
        if caught:
            converted[t.tensor_type.name] = converted.get(t.tensor_type.name, 0) + 1
        if new is None:
            continue
        if isinstance(mod, nn.Embedding):
            if hasattr(mod, "scale"):  # families whose embedding module scales its output keep doing so
                new.scale = mod.scale
            emb_name = mod_name
        setattr(modules[parent] if parent else model, child, new)
        record[mod_name] = mode
    if converted:
        warnings.warn("GGUF tensors without an exact low-bit kernel here were converted: " + ", ".join(
            f"{n} {k}" for k, n in sorted(converted.items())) + " (Q5_0 -> exact 8-bit codes; Q6_K and other "
            "k-quants -> requantized to q8f16_1)", stacklevel=2)
    if getattr(cfg, "tie_word_embeddings", False) and emb_name is not None:
        emb = dict(model.named_modules())[emb_name]
        if isinstance(emb, QuantEmbedding):
            model.lm_head = emb.as_lm_head()
            record["lm_head"] = "tied:" + emb_name
    return record


# --- building -----------------------------------------------------------------------------------------

def build(fam, cfg, weights: dict[str, torch.Tensor], *, device="cpu", dtype=torch.float32,
          max_seq_len: int | None = None) -> nn.Module:
    """Construct on the meta device, then strictly load ``weights`` (every key and shape checked)."""
    with torch.device("meta"):
        model = fam.Model(cfg, max_seq_len=max_seq_len)
    expected = model.state_dict()
    if getattr(cfg, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CorruptWeightsError(
            "checkpoint does not match the config: "
            + (f"missing {len(missing)} tensor(s) e.g. {missing[:3]}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {len(unexpected)} tensor(s) e.g. {unexpected[:3]}" if unexpected else ""))
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CorruptWeightsError(f"tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    state = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in weights.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    # non-persistent buffers (rotary frequencies) were built on the CPU; move them along
    model.to(device)
    return model.eval().requires_grad_(False)


def load(source, *, device="cpu", dtype=torch.float32, max_seq_len: int | None = None,
         quantization: str | None = None, verify: bool = False) -> Loaded:
    """Load any supported source; a pocketvlm package folder (``manifest.json``) is checked against its
    manifest (file sizes; sha256 too with ``verify``) and loaded with its recorded quantization."""
    from .package import is_package, load_package

    dtype = parse_dtype(dtype)
    if is_package(source):
        loaded = load_package(source, device=device, dtype=dtype, max_seq_len=max_seq_len, verify=verify)
        recorded = (loaded.quantization or {}).get("mode")
        if quantization and quantization != recorded:
            from .errors import QuantizationError

            raise QuantizationError(f"{source} is a package already quantized as {recorded!r}; "
                                    f"convert the original model to get {quantization!r}")
        return loaded
    kind, path = resolve(source)
    if kind == "gguf":
        native = quantization == "gguf"
        loaded = load_gguf(path, device=device, dtype=dtype, max_seq_len=max_seq_len, keep_quantized=native)
        if native:
            return loaded
    else:
        if quantization == "gguf":
            from .errors import QuantizationError

            raise QuantizationError("quantization 'gguf' (keep the file's own quantized blocks) needs a .gguf source")
        loaded = load_hf(path, device=device, dtype=dtype, max_seq_len=max_seq_len)
    if quantization:
        from .quant import quantize_model

        loaded.quantization = {"mode": quantization,
                               "modules": quantize_model(loaded.model, quantization, embeddings=True)}
    return loaded
