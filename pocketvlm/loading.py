"""One loading pipeline for every family and source.

source -> (HF folder | GGUF file) -> config dict -> family module (registry) -> build on the meta device
-> ``sanitize(weights)`` -> strict load that checks every key and shape -> tie weights -> device/dtype.
A GGUF file loaded with a quantization mode is streamed instead: checked against the meta model first, then
read tensor by tensor, each layer quantized as soon as it is complete (see :func:`load_gguf`).

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


def kv_cache_dtype_for(kv_cache_dtype, quantization: str | None, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype: as asked (``"float32"``, ``"float16"``, ``"bfloat16"``), else ("auto" / None)
    float16 for a float32 model with quantized weights (their error dwarfs the cache's fp16 rounding, as in
    llama.cpp, whose cache is f16 by default) and the model's dtype otherwise (exact, as the reference)."""
    if kv_cache_dtype not in (None, "auto"):
        return parse_dtype(kv_cache_dtype)
    quantized = bool(quantization) and not str(quantization).startswith("q0")
    return torch.float16 if quantized and dtype == torch.float32 else dtype


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
        return ("hf" if real.is_dir() else "gguf"), real
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


def image_processor_dict(folder: Path) -> dict | None:
    """The image processor's settings of an HF folder: ``preprocessor_config.json``, or (transformers >= 5's
    ``save_pretrained`` of a processor) the ``image_processor`` entry of ``processor_config.json``, with the
    processor's own keys (``processor_class``, ``patch_size``, ...) beside it; None if neither exists."""
    f, p = Path(folder) / "preprocessor_config.json", Path(folder) / "processor_config.json"
    try:
        if f.is_file():
            return json.loads(f.read_text())
        if p.is_file():
            d = json.loads(p.read_text())
            nested = d.get("image_processor") if isinstance(d, dict) else None
            if isinstance(nested, dict):
                outer = {k: v for k, v in d.items() if not isinstance(v, dict)}
                return {**outer, **nested}
    except json.JSONDecodeError as e:
        raise ConfigError(f"{folder}: the image processor configuration is not valid JSON: {e}") from e
    return None


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
              tensor_loader=None, quantization: str | None = None) -> Loaded:
    """Load a llama.cpp GGUF: config and tokenizer from its metadata, weights dequantized.

    Without ``quantization`` every tensor is dequantized and the model built as from a Hugging Face folder.
    With a mode (MLC's ``q4f16_1`` ..., or ``"gguf"`` to keep the file's own blocks) the model is filled
    tensor by tensor and each Linear/Embedding becomes its quantized module as soon as its tensors are in
    (:class:`_Stream`): the fp32 model never exists, so the peak memory is the quantized model plus the
    largest single fp32 tensor, not the whole fp32 model. The result is the same as
    ``quantize_model(load_gguf(path).model, mode, embeddings=True)`` (tested bit for bit).
    """
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
    loaded = Loaded(None, cfg, fam, str(path), "gguf", path, d, meta)
    if not quantization:
        weights = {}
        for t in reader.tensors:
            weights[hf_names[t.name]] = _read_tensor(load, t, path)
            reader.release(t)  # its pages are read (float tensors mapped back on use)
        weights = fam.gguf_sanitize(weights, cfg)
        loaded.model = build(fam, cfg, weights, device=device, dtype=dtype, max_seq_len=max_seq_len)
        return loaded
    if quantization != "gguf":
        from .quant import parse_mode

        parse_mode(quantization)  # an unknown mode fails before any tensor is read
    loaded.model, record = _stream_gguf(reader, fam, cfg, hf_names, load, quantization,
                                        device=device, dtype=dtype, max_seq_len=max_seq_len)
    loaded.quantization = {"mode": quantization, "modules": record}
    return loaded


def _read_tensor(load, t, path) -> torch.Tensor:
    try:
        return load(t)
    except PocketVLMError:
        raise
    except Exception as e:
        raise CorruptWeightsError(f"{path}: cannot read tensor data (truncated or corrupt?): {e}") from e


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
    return gguf_linear(data, t.tensor_type, t.shape, bias=mod.bias, dtype=dtype, name=t.name)


class _Stream:
    """A model built on the meta device and filled one tensor at a time.

    ``put(name, tensor)`` places a (sanitized) tensor; once every tensor of a Linear/Embedding is in,
    ``finish(name, module) -> (module, mode or None)`` runs and the module it returns takes the old one's place,
    so the fp32 weight can go at once. ``hold(name)`` marks a weight the caller keeps out of the model
    (GGUF blocks that ``finish`` turns straight into a quantized module). A head tied to an embedding
    (``tie_weights``, no tensor of its own) is settled right after that embedding, as ``quantize_model``
    does: over the quantized table (:func:`pocketvlm.quant.tied_head`), else sharing its weight.
    """

    def __init__(self, model: nn.Module, shapes: dict[str, tuple], finish, *, device, dtype):
        self.model, self.shapes, self.finish, self.device, self.dtype = model, shapes, finish, device, dtype
        self.record: dict[str, str] = {}
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # on meta tensors: only to learn which head shares which table
        mods = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
        self.pending = {n: {a for a, p in m._parameters.items() if p is not None} for n, m in mods.items()}
        owner = {id(m.weight): n for n, m in mods.items() if f"{n}.weight" in shapes}
        self.followers: dict[str, list[str]] = {}
        for n, m in mods.items():
            if f"{n}.weight" not in shapes and id(m.weight) in owner:
                self.followers.setdefault(owner[id(m.weight)], []).append(n)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        want = tuple(self.shapes[name])
        if tuple(tensor.shape) != want:
            raise CorruptWeightsError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {want}")
        if tensor.is_floating_point():
            tensor = tensor.to(device=self.device, dtype=self.dtype)
        else:
            tensor = tensor.to(self.device)
        mod_name, _, attr = name.rpartition(".")
        mod = self.model.get_submodule(mod_name)
        if attr in mod._parameters:
            mod._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            mod._buffers[attr] = tensor
        self._filled(mod_name, attr)

    def put_all(self, tensors: dict[str, torch.Tensor]) -> None:
        while tensors:
            self.put(*tensors.popitem())

    def hold(self, name: str) -> None:
        mod_name, _, attr = name.rpartition(".")
        self._filled(mod_name, attr)

    def _filled(self, mod_name: str, attr: str) -> None:
        left = self.pending.get(mod_name)
        if left is None:
            return
        left.discard(attr)
        if not left:
            del self.pending[mod_name]
            self._finish(mod_name)

    def _finish(self, name: str) -> None:
        from .quant.apply import TIED_PREFIX, _set, tied_head

        mod = self.model.get_submodule(name)
        new, mode = self.finish(name, mod)
        if new is not mod:
            _set(self.model, name, new)
        if mode is not None:
            self.record[name] = mode
        for head_name in self.followers.pop(name, ()):
            head = tied_head(self.model.get_submodule(head_name), new)
            if head is not None:
                del self.pending[head_name]
                _set(self.model, head_name, head)
                self.record[head_name] = TIED_PREFIX + name
            else:  # shares the table as build's tie_weights makes it, then is a Linear like any other
                self.model.get_submodule(head_name).weight = mod.weight
                self._filled(head_name, "weight")

    def close(self, order) -> tuple[nn.Module, dict[str, str]]:
        """The finished model (on its device, eval, no grad) and ``{module: mode}`` in ``order``."""
        left = sorted(self.pending) + [n for n, t in (*self.model.named_parameters(), *self.model.named_buffers())
                                       if t.is_meta]
        if left:
            raise CorruptWeightsError(f"checkpoint does not match the config: no data for {left[:3]}")
        self.model.to(self.device)  # non-persistent buffers (rotary frequencies) were built on the CPU
        rank: dict[str, int] = {}
        for i, n in enumerate(order):
            rank.setdefault(n, i)
        record = dict(sorted(self.record.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        return self.model.eval().requires_grad_(False), record


def _stream_gguf(reader, fam, cfg, hf_names, load, quantization: str, *, device, dtype, max_seq_len):
    """The GGUF's tensors streamed into a meta-built model, each Linear/Embedding quantized when complete:
    with an MLC mode by :func:`pocketvlm.quant.quantize_module` under :func:`pocketvlm.quant.module_mode`'s
    policy (embeddings included), with ``"gguf"`` by a module made from the file's own blocks (never
    dequantized when an exact kernel exists). Families' ``gguf_sanitize`` is applied tensor by tensor."""
    import warnings

    import numpy as np

    from .gguf_file import GGUFTensor
    from .quant import module_mode, quantize_module
    from .quant.gguf_blocks import torch_shape

    model = meta_model(fam, cfg, max_seq_len)
    # what sanitize keeps of each tensor, from shape-only tensors: the strict check runs before any data is read
    kept = {t.name: fam.gguf_sanitize({hf_names[t.name]: torch.empty(torch_shape(t.shape), device="meta")}, cfg)
            for t in reader.tensors}
    shapes = {k: tuple(v.shape) for out in kept.values() for k, v in out.items()}
    check_weights(model, cfg, shapes)
    # names only: a reference to a module would keep its fp32 weight alive after it was swapped out
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    native = quantization == "gguf"
    held: dict[str, GGUFTensor] = {}
    converted: dict[str, int] = {}

    def finish_mlc(name, mod):
        m = module_mode(name, mod, quantization, embeddings=True)
        return (mod, None) if m is None else (quantize_module(mod, m), m)

    def finish_gguf(name, mod):
        t = held.pop(name, None)
        if t is None:  # a float tensor in the file: stays an nn.Linear / nn.Embedding in ``dtype``
            return mod, None
        data = t.data
        order = _unpermuted_rows(fam, hf_names[t.name], data.shape[0], cfg)
        if order is not None:
            data = np.ascontiguousarray(data[order])
        with warnings.catch_warnings(record=True) as caught:  # one summary below, not one line per tensor
            warnings.simplefilter("always")
            new, mode = _gguf_module(mod, data, t, dtype)
        if caught:
            converted[t.tensor_type.name] = converted.get(t.tensor_type.name, 0) + 1
        if isinstance(mod, nn.Embedding) and hasattr(mod, "scale"):  # embeddings that scale their output
            new.scale = mod.scale
        reader.release(t)
        return new, mode

    stream = _Stream(model, shapes, finish_gguf if native else finish_mlc, device=device, dtype=dtype)
    float_types = {"F32", "F16", "BF16"}
    for t in reader.tensors:
        hf = hf_names[t.name]
        if not kept[t.name]:
            continue  # dropped by sanitize (a tied head's copy, rotary buffers): not even read
        mod_name, _, attr = hf.rpartition(".")
        if native and attr == "weight" and mod_name in kinds and hf in kept[t.name] \
                and t.tensor_type.name not in float_types:
            held[mod_name] = t
            stream.hold(hf)
            continue
        weights = {hf: _read_tensor(load, t, reader.path)}
        reader.release(t)  # the file's pages of this tensor are not needed while it is quantized
        weights = fam.gguf_sanitize(weights, cfg)
        # put_all empties the dict: no name here keeps the fp32 tensor alive once its module is quantized
        stream.put_all(weights)
    if converted:
        warnings.warn("GGUF tensors without an exact low-bit kernel here were converted: " + ", ".join(
            f"{n} {k}" for k, n in sorted(converted.items())) + " (Q6_K and other k-quants -> "
            "requantized to q8f16_1)", stacklevel=3)
    if native:  # the file's order, as the record of a whole-model swap had it
        order = [hf_names[t.name].rpartition(".")[0] for t in reader.tensors]
    else:  # quantize_model's order: embeddings, then linears
        order = sorted(kinds, key=lambda n: not issubclass(kinds[n], nn.Embedding))  # stable: module order kept
    return stream.close(order)


# --- building -----------------------------------------------------------------------------------------

def meta_model(fam, cfg, max_seq_len: int | None = None) -> nn.Module:
    """The family's model built on the meta device (no memory for weights)."""
    with torch.device("meta"):
        return fam.Model(cfg, max_seq_len=max_seq_len)


def check_weights(model: nn.Module, cfg, shapes: dict[str, tuple]) -> None:
    """Every tensor the model expects is there with its shape, and nothing else (a tied head's is optional)."""
    expected = model.state_dict()
    if getattr(cfg, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CorruptWeightsError(
            "checkpoint does not match the config: "
            + (f"missing {len(missing)} tensor(s) e.g. {missing[:3]}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {len(unexpected)} tensor(s) e.g. {unexpected[:3]}" if unexpected else ""))
    for k, shape in shapes.items():
        if tuple(shape) != tuple(expected[k].shape):
            raise CorruptWeightsError(f"tensor {k} has shape {tuple(shape)}, expected {tuple(expected[k].shape)}")


def build(fam, cfg, weights: dict[str, torch.Tensor], *, device="cpu", dtype=torch.float32,
          max_seq_len: int | None = None) -> nn.Module:
    """Construct on the meta device, then strictly load ``weights`` (every key and shape checked)."""
    model = meta_model(fam, cfg, max_seq_len)
    check_weights(model, cfg, {k: v.shape for k, v in weights.items()})
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
    if kind == "gguf":  # quantized module by module while the file is read
        return load_gguf(path, device=device, dtype=dtype, max_seq_len=max_seq_len, quantization=quantization)
    if quantization == "gguf":
        from .errors import QuantizationError

        raise QuantizationError("quantization 'gguf' (keep the file's own quantized blocks) needs a .gguf source")
    loaded = load_hf(path, device=device, dtype=dtype, max_seq_len=max_seq_len)
    if quantization:
        from .quant import quantize_model

        loaded.quantization = {"mode": quantization,
                               "modules": quantize_model(loaded.model, quantization, embeddings=True)}
    return loaded
