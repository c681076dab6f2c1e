"""LoRA on the vision tower's last layers, trained with the projector and the language model's adapters.

A frozen tower's features are computed once per image. With LoRA on its last ``layers`` blocks, what is
cached instead is the hidden state entering the first trained block (and any selected feature layer below
it); each step runs only the trained blocks (a few percent of the language model's cost at ViT-S size), so
the tower can learn to gather what the language model must find across image tokens (the tallest bar, the
letters of a word) into the patches themselves. Supported for towers that can run from a cached state
(``continue_states``: DINOv2). The adapter is saved in peft's format apart (``layers_to_transform``) and
merged into the tower's weights of the output folder, so ``transformers`` loads the trained model as is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from .lora import apply_lora, load_adapter_state, merge_lora, save_adapter

VISION_LORA_TARGETS = ("query", "key", "value", "dense", "fc1", "fc2")
PREFIX = "model.vision_tower."
FOLDER = "vision_adapter"   # in a training output; a recipe folder holds its files as vision_adapter_*


@dataclass(frozen=True)
class TowerLoRA:
    layers: int            # the last ``layers`` blocks of the tower
    r: int = 8
    alpha: float = 16.0
    targets: tuple = VISION_LORA_TARGETS

    def as_dict(self) -> dict:
        return {"layers": self.layers, "r": self.r, "alpha": float(self.alpha), "targets": sorted(self.targets)}


def _blocks(model):
    tower = model.model.vision_tower
    if not hasattr(tower, "continue_states"):
        raise ConfigError(f"LoRA on the vision tower needs a tower that runs from a cached state (DINOv2), "
                          f"not {type(tower).__module__.rsplit('.', 1)[-1]}")
    return tower, tower.encoder.layer


def first_trained(model, spec: TowerLoRA) -> int:
    """Index of the hidden state entering the first trained block."""
    _, blocks = _blocks(model)
    if not 1 <= spec.layers <= len(blocks):
        raise ConfigError(f"vision LoRA layers must be 1..{len(blocks)} (the tower's blocks), got {spec.layers}")
    return len(blocks) - spec.layers


def apply(model, spec: TowerLoRA) -> list[str]:
    """LoRA layers on the tower's last ``spec.layers`` blocks; returns their full names."""
    _, blocks = _blocks(model)
    start, found = first_trained(model, spec), []
    for i in range(start, len(blocks)):
        found += apply_lora(blocks[i], spec.targets, spec.r, spec.alpha, prefix=f"{PREFIX}encoder.layer.{i}.")
    return found


def _indices(model) -> list[int]:
    from ..models.clip import layer_index

    _, blocks = _blocks(model)
    return [layer_index(i, len(blocks)) for i in model.config.feature_layers]


@torch.no_grad()
def cache_states(model, pix: torch.Tensor, start: int) -> list[dict]:
    """Per image of ``pix``: the hidden state at ``start`` and the selected feature states below it (bf16)."""
    tower, _ = _blocks(model)
    keep = sorted({start, *(j for j in _indices(model) if j < start)})
    states = tower.hidden_states(pix.to(tower.embeddings.cls_token.dtype), keep)
    return [{j: s[b].to(torch.bfloat16).cpu().clone() for j, s in zip(keep, states)} for b in range(len(pix))]


def features(model, cached: dict, start: int, device) -> torch.Tensor:
    """The selected tower features ``[tokens, D]`` of one image from its cached states, running the trained
    blocks (gradients flow into their LoRA layers)."""
    from ..models.clip import select_features

    tower, _ = _blocks(model)
    idx = _indices(model)
    dtype = tower.embeddings.cls_token.dtype
    run = [j for j in idx if j > start]
    ran = dict(zip(run, tower.continue_states(cached[start].to(device, dtype)[None], start, run))) if run else {}
    states = [ran[j] if j in ran else cached[j].to(device, dtype)[None] for j in idx]
    states = [select_features(h, model.config.vision_feature_select_strategy) for h in states]
    return torch.cat(states, dim=-1)[0]


def save(model, folder: Path, spec: TowerLoRA, base_model: str | None = None) -> Path:
    """The tower's adapter in peft's format; ``layers_to_transform`` names the trained blocks."""
    tower, blocks = _blocks(model)
    out = save_adapter(tower, folder, r=spec.r, alpha=spec.alpha, targets=spec.targets, prefix=PREFIX,
                       base_model=base_model)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(layers_to_transform=list(range(len(blocks) - spec.layers, len(blocks))), layers_pattern="layer")
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def spec_of(adapter_config: dict) -> TowerLoRA:
    """The TowerLoRA an adapter_config.json written by ``save`` describes."""
    return TowerLoRA(layers=len(adapter_config["layers_to_transform"]), r=adapter_config["r"],
                     alpha=float(adapter_config["lora_alpha"]), targets=tuple(sorted(adapter_config["target_modules"])))


def load(model, state: dict) -> None:
    """peft-named tower LoRA tensors into the model (``apply`` already run), in float32."""
    load_adapter_state(model.model.vision_tower, {k: v.float() for k, v in state.items()}, prefix=PREFIX)


def merge(model) -> int:
    return merge_lora(model.model.vision_tower)
