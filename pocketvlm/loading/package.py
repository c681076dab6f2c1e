"""Reading a pocketvlm package folder (written by :func:`pocketvlm.package.convert`): sizes (and sha256 with
``verify``) checked against ``manifest.json``, the model rebuilt on meta with the recorded quantized modules,
the saved tensors loaded strictly."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CorruptWeightsError, PackageError
from ..models import registry
from . import package_files
from .core import Loaded, meta_model, parse_dtype
from .hf import read_config

_SCALE_KEYS = ("scales", "zeros")


def scale_keys(model: nn.Module) -> set[str]:
    """State-dict keys of quantized modules' scales/zeros: they keep their own dtype."""
    from ..quant import QuantLinear

    keys = set()
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            keys.update(f"{n}.{k}" if n else k for k in _SCALE_KEYS)
    return keys


def is_package(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / package_files.MANIFEST).is_file()


def build_skeleton(config: dict, *, max_seq_len: int | None = None) -> tuple[nn.Module, object, object]:
    """(model on meta with the recorded quantized modules, family, Config) from a package config."""
    from ..quant import build_quantized

    fam = registry.family(config["model_type"])
    cfg = fam.Config.from_dict(config)
    model = meta_model(fam, cfg, max_seq_len)
    record = (config.get("quantization") or {}).get("modules") or {}
    if record:
        build_quantized(model, record)
    return model, fam, cfg


def load_package(folder, *, device="cpu", dtype=torch.float32, max_seq_len: int | None = None,
                 verify: bool = False) -> Loaded:
    """Load a package folder: sizes checked against the manifest (and sha256 with ``verify``), the model
    rebuilt on meta with the recorded quantized modules, the saved tensors loaded strictly."""
    from ..quant import QuantEmbedding
    from ..quant.linear import KERNEL_LAYOUT, QuantLinear

    folder = Path(folder).expanduser()
    manifest = package_files.read_manifest(folder)
    package_files.verify_files(folder, manifest, full=verify)
    dtype = parse_dtype(dtype)
    config = read_config(folder)
    q = config.get("quantization")
    if not isinstance(q, dict) or "mode" not in q:
        raise PackageError(f"{folder}/config.json has no 'quantization' entry; re-run `pocketvlm convert`")
    layout = q.get("kernel_layout")
    if layout not in (None, KERNEL_LAYOUT):
        raise PackageError(f"{folder} stores its 4-bit weights in the kernel layout {layout!r}; this pocketvlm "
                           f"reads {KERNEL_LAYOUT!r} and the plain layout: re-run `pocketvlm convert`, or upgrade")
    model, fam, cfg = build_skeleton(config, max_seq_len=max_seq_len)
    expected = model.state_dict()
    # 4-bit qweights stored in the kernel layout (quant.linear.KERNEL_LAYOUT) instead of the plain one
    kernel_shapes = {}
    for n, m in model.named_modules():
        if layout and isinstance(m, QuantLinear) and m.stored_kernel_shape() is not None:
            m.expect_kernel_layout()
            kernel_shapes[f"{n}.qweight"] = m.stored_kernel_shape()
    keep = scale_keys(model)

    def want(name, stored, shape):
        e = expected.get(name)
        if e is None or not stored.is_floating_point:
            return None
        return stored if name in keep else dtype

    state: dict[str, torch.Tensor] = {}
    for f in package_files.weight_files(folder):
        state.update(package_files.read_tensors(f, want))
    for dup, orig in (q.get("tied") or {}).items():
        if orig in state:
            state[dup] = state[orig]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CorruptWeightsError(f"{folder}: the saved tensors do not match the model: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(kernel_shapes.get(k, expected[k].shape)):
            raise CorruptWeightsError(f"{folder}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        if k in keep and v.dtype != expected[k].dtype:
            raise CorruptWeightsError(f"{folder}: tensor {k} is {v.dtype}, the recorded mode stores {expected[k].dtype}")
    if device != "cpu":
        state = {k: v.to(device) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    del state
    for m in model.modules():
        if isinstance(m, QuantEmbedding):
            m.dtype = dtype  # built on meta as float32; rows come out in the activation dtype
    if torch.device(device).type != "cpu":  # (to the CPU is no move, and would unpack the kernel layout)
        model.to(device)  # non-persistent buffers (rotary tables) were built on the CPU
    model.eval().requires_grad_(False)
    loaded = Loaded(model, cfg, fam, str(folder), "package", folder, config)
    loaded.quantization = q  # its "mode" and "modules", as a load that quantizes records them
    return loaded
