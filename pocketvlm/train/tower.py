"""LoRA on the vision tower's last layers, trained with the projector and the language model's adapters.

A frozen tower's features are computed once per image. With LoRA on its last ``layers`` blocks (the last
up to the deepest selected feature layer: for CLIP's usual penultimate layer, not the very last), what is
cached instead is the hidden state entering the first trained block (and any selected feature layer below
it); each step runs only the trained blocks (a few percent of the language model's cost at ViT-S size), so
the tower can learn to gather what the language model must find across image tokens (the tallest bar, the
letters of a word) into the patches themselves. Every tower family (DINOv2, CLIP, SigLIP) says where its
blocks are (``blocks_path``), what LoRA targets in them by default (``lora_targets``, HF names) and runs from a
cached state (``continue_states``). The adapter is saved in peft's format apart (``layers_to_transform``) and
merged into the tower's weights of the output folder, so ``transformers`` loads the trained model as is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from .lora import apply_lora, load_adapter_state, merge_lora, save_adapter

PREFIX = "model.vision_tower."
FOLDER = "vision_adapter"   # in a training output; a recipe folder holds its files as vision_adapter_*


@dataclass(frozen=True)
class TowerLoRA:
    layers: int            # how many blocks (see ``trained_blocks``)
    r: int = 8
    alpha: float = 16.0
    targets: tuple = ()    # () = the tower family's ``lora_targets``

    def as_dict(self) -> dict:
        return {"layers": self.layers, "r": self.r, "alpha": float(self.alpha), "targets": sorted(self.targets)}

    def same_shape(self, other: "TowerLoRA") -> bool:
        """Equal blocks, rank and alpha (targets are the tower's unless a recipe names them)."""
        return (self.layers, self.r, float(self.alpha)) == (other.layers, other.r, float(other.alpha))


def _blocks(model):
    tower = model.model.vision_tower
    return tower.get_submodule(tower.blocks_path)


def targets_of(model, spec: TowerLoRA) -> tuple:
    return tuple(spec.targets) or model.model.vision_tower.lora_targets


def trained_blocks(model, spec: TowerLoRA) -> range:
    """The ``spec.layers`` blocks that end at the deepest selected feature layer (the tower's last ones for
    ``vision_feature_layer=-1``; a block past the deepest feature layer would change nothing the LLM sees)."""
    deepest = max(_indices(model))
    if not 1 <= spec.layers <= deepest:
        raise ConfigError(f"vision LoRA layers must be 1..{deepest} (the tower's blocks up to its deepest feature "
                          f"layer, hidden state {deepest}), got {spec.layers}")
    return range(deepest - spec.layers, deepest)


def first_trained(model, spec: TowerLoRA) -> int:
    """Index of the hidden state entering the first trained block."""
    return trained_blocks(model, spec).start


def apply(model, spec: TowerLoRA) -> list[str]:
    """LoRA layers on the blocks of ``trained_blocks``; returns their full names."""
    tower, blocks = model.model.vision_tower, _blocks(model)
    found = []
    for i in trained_blocks(model, spec):
        found += apply_lora(blocks[i], targets_of(model, spec), spec.r, spec.alpha,
                            prefix=f"{PREFIX}{tower.blocks_path}.{i}.")
    return found


def _dtype(tower) -> torch.dtype:
    return next(tower.parameters()).dtype


def _indices(model) -> list[int]:
    from ..models.clip import layer_index

    return [layer_index(i, len(_blocks(model))) for i in model.config.feature_layers]


@torch.no_grad()
def cache_states(model, pix: torch.Tensor, start: int) -> list[dict]:
    """Per image of ``pix``: the hidden state at ``start`` and the selected feature states below it (bf16)."""
    tower = model.model.vision_tower
    keep = sorted({start, *(j for j in _indices(model) if j < start)})
    states = tower.hidden_states(pix.to(_dtype(tower)), keep)
    return [{j: s[b].to(torch.bfloat16).cpu().clone() for j, s in zip(keep, states)} for b in range(len(pix))]


def features(model, cached: dict, start: int, device) -> torch.Tensor:
    """The selected tower features ``[tokens, D]`` of one image from its cached states, running the trained
    blocks (gradients flow into their LoRA layers)."""
    from ..models.clip import select_features

    tower = model.model.vision_tower
    idx = _indices(model)
    dtype = _dtype(tower)
    run = [j for j in idx if j > start]
    ran = dict(zip(run, tower.continue_states(cached[start].to(device, dtype)[None], start, run))) if run else {}
    states = [ran[j] if j in ran else cached[j].to(device, dtype)[None] for j in idx]
    states = [select_features(h, model.config.vision_feature_select_strategy) for h in states]
    return torch.cat(states, dim=-1)[0]


def save(model, folder: Path, spec: TowerLoRA, base_model: str | None = None) -> Path:
    """The tower's adapter in peft's format; ``layers_to_transform`` names the trained blocks."""
    tower = model.model.vision_tower
    out = save_adapter(tower, folder, r=spec.r, alpha=spec.alpha, targets=targets_of(model, spec), prefix=PREFIX,
                       base_model=base_model)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(layers_to_transform=list(trained_blocks(model, spec)),
               layers_pattern=tower.blocks_path.rsplit(".", 1)[-1])
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
