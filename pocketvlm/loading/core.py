"""What every load produces and the strict build every source ends in: a family's model on the meta
device, every key and shape checked, weights assigned, ties restored, device and dtype applied."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, CorruptWeightsError

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
    image_processor: dict | None = None  # preprocessing settings a source carries itself (an mmproj file)
    mmproj: str | None = None  # the mmproj file a GGUF VLM was joined from


@contextmanager
def on_meta():
    """Build modules on the meta device without running their initializers: the weights are loaded next, and
    torch's ``normal_`` on a meta tensor imports ``torch._dynamo`` (and sympy: ~75 MiB resident, ~1 s)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, _no_init)
        with torch.device("meta"):
            yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def _no_init(tensor, *args, **kwargs):
    return tensor


def meta_model(fam, cfg, max_seq_len: int | None = None) -> nn.Module:
    """The family's model built on the meta device (no memory for weights)."""
    with on_meta():
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

