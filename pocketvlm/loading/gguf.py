"""llama.cpp GGUF files: config and tokenizer from the metadata, tensors mapped to Hugging Face names,
dequantized, or streamed into quantized modules layer by layer (:func:`load_gguf`)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CorruptWeightsError, PocketVLMError
from ..models import registry
from .core import Loaded, build, check_weights, meta_model

def gguf_reader(path: Path):
    """The parsed GGUF file (:class:`pocketvlm.loading.gguf_file.GGUFFile`: ``metadata`` and ``tensors``)."""
    from .gguf_file import read_gguf

    return read_gguf(path)


def gguf_metadata(reader) -> dict[str, Any]:
    return reader.metadata


def gguf_tensor_to_torch(t) -> torch.Tensor:
    """Dequantize one GGUF tensor to fp32 in PyTorch's [out, in] layout."""
    from ..quant.gguf_blocks import dequantize_gguf, torch_shape

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
        from ..quant import parse_mode

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
    if not getattr(fam, "GGUF_QK_PERMUTED", False):
        return None
    if hf_name.endswith("q_proj.weight"):
        heads = cfg.num_attention_heads
    elif hf_name.endswith("k_proj.weight"):
        heads = cfg.n_kv_heads
    else:
        return None
    return fam.unpermute_qk(torch.arange(rows)[:, None], heads)[:, 0].numpy()


def _gguf_module(mod, data, t, dtype):
    from ..quant import gguf_embedding, gguf_linear

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
        from ..quant.apply import TIED_PREFIX, _set, tied_head

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
    from ..quant import module_mode, quantize_module
    from ..quant.gguf_blocks import torch_shape

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

