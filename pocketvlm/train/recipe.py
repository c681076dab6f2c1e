"""A trained LLaVA as a recipe: the real parts it was built from (by built-in name) plus only what training
made (projector and LoRA adapters, a few MB; LoRA on the tower's last blocks too, when trained), rebuilt into
a full model folder on first use.

``recipe.json`` names the language model and vision tower, the assembly options, the LoRA settings and the
sha256 of each shipped file; ``build`` checks them, assembles the base (``assemble_llava``), loads the
projector, merges the LoRA in float32 and saves the LLaVA folder.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import CorruptWeightsError
from . import tower

RECIPE = "recipe.json"


def _sha256(path: Path) -> str:
    from ..loading.package_files import sha256

    return sha256(path)


def write_recipe(trained: Path, out: Path, *, llm: str, vision: str, note: str = "",
                 dtype: torch.dtype = torch.float16) -> Path:
    """From a training output folder (``projector.safetensors``, ``adapter/``, ``train_config.json`` and the
    base's ``config.json``) write the shippable recipe folder (trained tensors in ``dtype``)."""
    from safetensors.torch import load_file, save_file

    trained, out = Path(trained), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tc = json.loads((trained / "train_config.json").read_text())
    cfg = json.loads((trained / "config.json").read_text())
    files = {}
    proj = load_file(str(trained / "projector.safetensors"))
    save_file({k: v.to(dtype).contiguous() for k, v in proj.items()}, str(out / "projector.safetensors"))
    files["projector.safetensors"] = _sha256(out / "projector.safetensors")
    adapter = trained / "adapter"
    if adapter.exists():
        files.update(_ship_adapter(adapter, out, "adapter_", dtype)[0])
    vision_lora = None
    if (trained / tower.FOLDER).exists():
        shipped, acfg = _ship_adapter(trained / tower.FOLDER, out, f"{tower.FOLDER}_", dtype)
        files.update(shipped)
        vision_lora = tower.spec_of(acfg).as_dict()
    vcfg = cfg["vision_config"]
    layers = cfg["vision_feature_layer"]
    recipe = {"llm": llm, "vision": vision, "image_size": vcfg["image_size"],
              "feature_layers": layers if isinstance(layers, list) else [layers],
              "strategy": cfg["vision_feature_select_strategy"],
              "lora": {"r": tc["lora_r"], "alpha": tc["lora_alpha"], "targets": list(tc["lora_targets"])}
              if adapter.exists() else None,
              "files": files, "note": note}
    if vision_lora:
        recipe["vision_lora"] = vision_lora
    (out / RECIPE).write_text(json.dumps(recipe, indent=2))
    return out


def _ship_adapter(src: Path, out: Path, prefix: str, dtype) -> tuple[dict, dict]:
    """A peft adapter folder's tensors (in ``dtype``) and config as ``out/<prefix>model.safetensors`` and
    ``out/<prefix>config.json``; returns ({file: sha256}, the config)."""
    from safetensors.torch import load_file, save_file

    a = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: v.to(dtype).contiguous() for k, v in a.items()}, str(out / f"{prefix}model.safetensors"))
    acfg = json.loads((src / "adapter_config.json").read_text())
    # the training machine's base folder means nothing elsewhere: the base is rebuilt from the recipe
    acfg["base_model_name_or_path"] = None
    (out / f"{prefix}config.json").write_text(json.dumps(acfg, indent=2))
    return {f"{prefix}model.safetensors": _sha256(out / f"{prefix}model.safetensors")}, acfg


#: Bumped when the assembly itself changes (what a rebuilt folder holds besides the shipped tensors), so a
#: folder built by an older pocketvlm is rebuilt. 2: the <image> LM-head row is the mean row.
BUILD_VERSION = 2


def recipe_id(recipe_dir: Path) -> str:
    """What a built folder must have been built from: the recipe (with its files' sha256) and BUILD_VERSION."""
    data = (Path(recipe_dir) / RECIPE).read_bytes() + f"build {BUILD_VERSION}".encode()
    return hashlib.sha256(data).hexdigest()[:16]


def build(recipe_dir, out, resolve_part) -> Path:
    """Rebuild the model of ``recipe_dir`` into ``out``. ``resolve_part(name)`` gives the path of a built-in
    part (the LLM GGUF, the Dinov2Model folder)."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from .assemble import assemble_llava
    from .loop import merged_llava, save_llava

    recipe_dir, out = Path(recipe_dir), Path(out)
    r = json.loads((recipe_dir / RECIPE).read_text())
    for name, digest in r["files"].items():
        got = _sha256(recipe_dir / name)
        if got != digest:
            raise CorruptWeightsError(f"{recipe_dir / name}: sha256 {got} does not match the recipe's {digest}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp, \
            tqdm(total=4, desc=f"assembling {out.name}", unit="step") as bar:
        base = assemble_llava(resolve_part(r["llm"]), resolve_part(r["vision"]), Path(tmp) / "base",
                              image_size=r["image_size"], feature_layers=tuple(r["feature_layers"]),
                              strategy=r["strategy"])
        bar.update()
        proj = load_file(str(recipe_dir / "projector.safetensors"))
        bar.update()
        adapter = load_file(str(recipe_dir / "adapter_model.safetensors")) if r.get("lora") else None
        vision = None
        if r.get("vision_lora"):
            v = r["vision_lora"]
            vision = {"state": load_file(str(recipe_dir / f"{tower.FOLDER}_model.safetensors")),
                      "spec": tower.TowerLoRA(v["layers"], v["r"], v["alpha"], tuple(v["targets"]))}
        model = merged_llava(base, proj, adapter, r.get("lora"), vision)
        bar.update()
        staging = Path(tmp) / "model"
        staging.mkdir()
        save_llava(model, base, staging)
        shutil.copyfile(recipe_dir / RECIPE, staging / RECIPE)
        # the adapters apart, in peft's layout (not at the top: transformers would take the folder for a bare
        # adapter); the recipe holds them as <prefix>model.safetensors / <prefix>config.json
        for wanted, folder, prefix in ((r.get("lora"), "adapter", "adapter_"),
                                       (vision, tower.FOLDER, f"{tower.FOLDER}_")):
            if wanted:
                (staging / folder).mkdir()
                for part in ("config.json", "model.safetensors"):
                    shutil.copyfile(recipe_dir / f"{prefix}{part}", staging / folder / f"adapter_{part}")
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
        bar.update()
    return out
