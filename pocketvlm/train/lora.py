"""LoRA adapters as a layer swap, saved in ``peft``'s format.

``apply_lora`` replaces each targeted ``nn.Linear`` of a module tree by ``LoRALinear``: the frozen layer
(``base_layer``) plus ``lora_B(lora_A(x)) * alpha / r``; ``lora_B`` starts at zero, so the model is unchanged
until trained. ``merge_lora`` folds ``W += scale * B @ A`` back into plain ``nn.Linear`` layers (what a
deployed or exported model holds). ``save_adapter`` writes ``adapter_model.safetensors`` +
``adapter_config.json`` with peft's key names (``base_model.model.<module>.lora_A.weight``), so
``peft.PeftModel.from_pretrained`` can read the adapters apart from the merged model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.lora_A = nn.Linear(base.in_features, r, bias=False, dtype=torch.float32, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, dtype=torch.float32, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default init
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def in_features(self):
        return self.base_layer.in_features

    @property
    def out_features(self):
        return self.base_layer.out_features

    def forward(self, x):
        y = self.base_layer(x)
        d = self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype))) * self.scale
        return y + d.to(y.dtype)

    def merged(self) -> nn.Linear:
        base = self.base_layer
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        dtype=base.weight.dtype, device=base.weight.device)
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale
            out.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out.requires_grad_(False)


def linear_names(root: nn.Module) -> list[str]:
    """Short names (last path component) of the linear layers under ``root``."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in root.named_modules() if isinstance(m, nn.Linear)})


def apply_lora(root: nn.Module, targets, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               prefix: str = "") -> list[str]:
    """Swap the ``nn.Linear`` layers under ``root`` whose last name is in ``targets``; returns their full
    names (``prefix`` + path). A target that matches nothing is an error listing the linear layers."""
    targets = list(targets)
    if r < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {r}")
    found = []
    for name, mod in list(root.named_modules()):
        for child_name, child in list(mod.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(mod, child_name, LoRALinear(child, r, alpha, dropout))
                found.append(f"{prefix}{name + '.' if name else ''}{child_name}")
    missing = [t for t in targets if not any(f.endswith("." + t) or f == t for f in found)]
    if missing:
        raise ConfigError(f"LoRA target(s) {', '.join(map(repr, missing))} match no linear layer; "
                          f"the language model's linear layers are: {', '.join(linear_names(root)) or 'none'}")
    return found


def lora_modules(root: nn.Module, prefix: str = "") -> dict[str, LoRALinear]:
    return {prefix + n: m for n, m in root.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(root: nn.Module) -> int:
    """Replace every LoRALinear under ``root`` by its merged nn.Linear; returns how many were merged."""
    n = 0
    for _, mod in list(root.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                setattr(mod, child_name, child.merged())
                n += 1
    return n


def adapter_state(root: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """peft-named adapter tensors: ``base_model.model.<prefix><module>.lora_A.weight`` etc."""
    out = {}
    for name, m in lora_modules(root, prefix).items():
        out[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight.detach().cpu()
        out[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.weight.detach().cpu()
    return out


def save_adapter(root: nn.Module, folder, *, r: int, alpha: float, targets, prefix: str = "",
                 base_model: str | None = None, dtype=torch.float16) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype).contiguous() for k, v in adapter_state(root, prefix).items()}
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
           "target_modules": sorted(set(targets)), "bias": "none", "fan_in_fan_out": False,
           "base_model_name_or_path": base_model, "inference_mode": True, "init_lora_weights": True,
           "modules_to_save": None}
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def load_adapter_state(root: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Copy peft-named tensors into the LoRALinear layers under ``root`` (shapes checked)."""
    mods = lora_modules(root, prefix)
    for name, m in mods.items():
        for part in ("lora_A", "lora_B"):
            key = f"base_model.model.{name}.{part}.weight"
            if key not in state:
                raise ConfigError(f"adapter lacks {key}")
            w = getattr(m, part).weight
            if tuple(state[key].shape) != tuple(w.shape):
                raise ConfigError(f"adapter tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(w.shape)}")
            with torch.no_grad():
                w.copy_(state[key])
