"""LoRA on the vision tower's last blocks (``pocketvlm.train.tower``), on test_train's tiny random parts: the
cached-state path gives the tower's own features; stage 2 trains the tower's LoRA with the rest and merges
it into the tower only (pocketvlm and transformers load the output with equal logits), for DINOv2, CLIP and
SigLIP towers; a recipe carries it; init_from continues it; what does not fit is a clear error."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pocketvlm.errors import ConfigError
from pocketvlm.image import load_image, preprocess
from pocketvlm.models import dinov2
from pocketvlm.train import assemble_llava, tower, train
import test_train
from test_train import PATCH, SIZE, _cfg, _hf, _inputs, _log, _ours

parts, base, tok = test_train.parts, test_train.base, test_train.tok   # its fixtures, built again for this module

transformers = pytest.importorskip("transformers")
DINO_TARGETS = sorted(dinov2.Model.lora_targets)


def _pixels(folder, name="red"):
    from pocketvlm.image import ImageProcessorConfig

    proc = ImageProcessorConfig.from_dict(json.loads((folder / "preprocessor_config.json").read_text()))
    return preprocess(load_image(str(folder.parent / "data" / "img" / f"{name}.png")), proc).pixel_values


@pytest.fixture(scope="module")
def tuned(parts, base):
    return train(_cfg(base, parts.root / "tower", data=str(parts.train_json), stage=2, lr=1e-2, lora_r=2,
                      max_steps=10, lora_targets=("q_proj",), vision_lora_layers=1, vision_lora_r=2,
                      vision_lr=5e-2))


@pytest.mark.parametrize("layers", [1, 2])
def test_cached_states_give_the_towers_own_features(base, layers):
    model = _ours(base)
    pv = _pixels(base)
    spec = tower.TowerLoRA(layers, r=2, alpha=4)
    start = tower.first_trained(model, spec)
    with torch.no_grad():
        ref = model.image_hidden_states(pv)[0]
        tower.apply(model, spec)   # B = 0: unchanged
        cached = tower.cache_states(model, pv, start)[0]
        got = tower.features(model, cached, start, "cpu")
    assert set(cached) == {start}
    torch.testing.assert_close(got, ref, atol=0.02 * float(ref.abs().max()), rtol=0)  # the cache is bf16


def test_stage2_trains_the_towers_last_block_and_merges_it(base, tuned, tok):
    log = _log(tuned)
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], [r["loss"] for r in log]  # measured 6.46 -> 4.80
    vcfg = json.loads((tuned / tower.FOLDER / "adapter_config.json").read_text())
    want = (2, [1], sorted(DINO_TARGETS))
    assert (vcfg["r"], vcfg["layers_to_transform"], vcfg["target_modules"]) == want
    adapter = load_file(str(tuned / tower.FOLDER / "adapter_model.safetensors"))
    assert len(adapter) == 2 * 6 and all(".encoder.layer.1." in k for k in adapter)
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)
    before, after = load_file(str(base / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    in_tower = {k for k in changed if "vision_tower" in k}
    assert in_tower == {k for k in before if "vision_tower.encoder.layer.1." in k and k.endswith(".weight")
                        and any(f".{t}." in k for t in DINO_TARGETS)}
    assert {k for k in changed - in_tower if "vision_tower" in k} == set()
    ids, pv = _inputs(base, tok)
    with torch.no_grad():
        ours, hf = _ours(tuned)(ids, pixel_values=pv), _hf(tuned)(input_ids=ids, pixel_values=pv).logits
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=0)


def test_recipe_and_init_from_carry_the_tower_adapter(parts, base, tuned, tok, tmp_path):
    from pocketvlm.train.recipe import build, write_recipe

    recipe = write_recipe(tuned, tmp_path / "recipe", llm="tiny-llm", vision="tiny-vision", dtype=torch.float32)
    r = json.loads((recipe / "recipe.json").read_text())
    assert r["vision_lora"] == {"layers": 1, "r": 2, "alpha": 16.0, "targets": sorted(DINO_TARGETS)}
    assert set(r["files"]) == {"projector.safetensors", "adapter_model.safetensors", "vision_adapter_model.safetensors"}
    built = build(recipe, tmp_path / "built", {"tiny-llm": parts.qwen, "tiny-vision": parts.vision}.get)
    ids, pv = _inputs(base, tok)
    with torch.no_grad():
        torch.testing.assert_close(_ours(built)(ids, pixel_values=pv), _ours(tuned)(ids, pixel_values=pv),
                                   atol=1e-5, rtol=0)
    kw = dict(data=str(parts.train_json), stage=2, lora_r=2, max_steps=1, batch_size=4, lora_targets=("q_proj",),
              vision_lora_layers=1, vision_lora_r=2)
    for i, init in enumerate((tuned, recipe)):   # lr 0: the trained parts come back exactly
        out = train(_cfg(base, tmp_path / f"cont{i}", init_from=str(init), lr=0.0, **kw))
        a, b = (load_file(str(f / tower.FOLDER / "adapter_model.safetensors")) for f in (tuned, out))
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    with pytest.raises(ConfigError, match=r"holds vision-tower LoRA on the last 1 blocks, r=2 .* asks for none"):
        train(_cfg(base, tmp_path / "x", init_from=str(tuned), **{**kw, "vision_lora_layers": 0}))
    with pytest.raises(ConfigError, match=r"asks for 2 blocks"):
        train(_cfg(base, tmp_path / "y", init_from=str(recipe), **{**kw, "vision_lora_layers": 2}))


def test_bad_tower_lora_setups(parts, base, tmp_path):
    kw = dict(data=str(parts.train_json), max_steps=1, batch_size=1)
    with pytest.raises(ConfigError, match=r"vision LoRA layers must be 1\.\.2"):
        train(_cfg(base, tmp_path / "a", stage=2, vision_lora_layers=3, **kw))
    with pytest.raises(ConfigError, match="trains at stage 2"):
        train(_cfg(base, tmp_path / "b", stage=1, vision_lora_layers=1, **kw))
    with pytest.raises(ConfigError, match="calibrate the projector at stage 1"):
        train(_cfg(base, tmp_path / "c", stage=2, vision_lora_layers=1, projector_init="calibrate", **kw))
    out = tmp_path / "e"
    train(_cfg(base, out, stage=2, vision_lora_layers=1, **kw))
    with pytest.raises(ConfigError, match="another model, data or training setup"):
        train(_cfg(base, out, stage=2, vision_lora_layers=2, resume=True, **kw))


@pytest.mark.parametrize("kind, feature_layer, block", [("clip", -2, 0), ("siglip", -1, 1)])
def test_clip_and_siglip_towers_train_the_blocks_up_to_the_feature_layer(parts, tok, kind, feature_layer, block):
    """CLIP's usual feature layer is the penultimate: the trained block is the one that makes it, not the last."""
    vision = parts.root / f"{kind}-tower"
    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
                patch_size=PATCH)
    torch.manual_seed(3)
    if kind == "clip":
        cfg = transformers.CLIPVisionConfig(**dims, initializer_range=0.2)
        transformers.CLIPVisionModel(cfg).save_pretrained(vision)
    else:
        transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**dims)).save_pretrained(vision)
    base = assemble_llava(parts.qwen, vision, parts.root / f"{kind}-base", image_size=SIZE,
                          feature_layers=(feature_layer,))
    model, pv = _ours(base), _pixels(base)
    spec = tower.TowerLoRA(1, r=2, alpha=4)
    start = tower.first_trained(model, spec)
    assert start == block
    with torch.no_grad():
        ref = model.image_hidden_states(pv)[0]
        tower.apply(model, spec)
        got = tower.features(model, tower.cache_states(model, pv, start)[0], start, "cpu")
    torch.testing.assert_close(got, ref, atol=0.02 * float(ref.abs().max()), rtol=0)
    if kind == "clip":
        with pytest.raises(ConfigError, match=r"vision LoRA layers must be 1\.\.1 .*hidden state 1\), got 2"):
            tower.first_trained(model, tower.TowerLoRA(2))

    tuned = train(_cfg(base, parts.root / f"{kind}-tuned", data=str(parts.train_json), stage=2, lr=1e-2, lora_r=2,
                       max_steps=10, lora_targets=("q_proj",), vision_lora_layers=1, vision_lora_r=2, vision_lr=5e-2))
    targets = sorted(type(model.model.vision_tower).lora_targets)
    vcfg = json.loads((tuned / tower.FOLDER / "adapter_config.json").read_text())
    assert (vcfg["layers_to_transform"], vcfg["layers_pattern"], vcfg["target_modules"]) == ([block], "layers", targets)
    adapter = load_file(str(tuned / tower.FOLDER / "adapter_model.safetensors"))
    assert len(adapter) == 2 * 6 and all(f".encoder.layers.{block}." in k for k in adapter)
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)
    # the assembled base keeps the tower checkpoint's own names, a trained folder pocketvlm's: both load in HF
    before, after = ({k.replace("tower.vision_model.", "tower."): v
                      for k, v in load_file(str(f / "model.safetensors")).items()} for f in (base, tuned))
    in_tower = {k for k in before if "vision_tower" in k and not torch.equal(before[k], after[k])}
    assert in_tower == {k for k in before if f"vision_tower.encoder.layers.{block}." in k
                        and k.endswith(".weight") and any(f".{t}." in k for t in targets)}
    ids, pv = _inputs(base, tok)
    with torch.no_grad():
        ours, hf = _ours(tuned)(ids, pixel_values=pv), _hf(tuned)(input_ids=ids, pixel_values=pv).logits
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=0)
