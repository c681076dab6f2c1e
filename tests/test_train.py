"""pocketvlm.train on tiny random parts: a Qwen2ForCausalLM and a Dinov2Model saved by transformers, solid-colour
PNGs and LLaVA-format JSON. The assembled LLaVA loads in pocketvlm and transformers with equal logits; the loss
mask holds exactly the answers; stage 1 moves only the projector, stage 2's merged output equals base + projector
+ LoRA; resume continues where it stopped and refuses another setup's checkpoint; every bad input is a clear
error or a skip counted with its reason; the CLI assembles and trains."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pocketvlm import cli, loading
from pocketvlm.errors import ConfigError, DataError
from pocketvlm.image import load_image, preprocess
from pocketvlm.train import (Encoder, TrainConfig, apply_lora, assemble_llava, load_dataset, loop, merge_lora,
                             to_messages, train)
from pocketvlm.train.data import IGNORE
from pocketvlm.train.lora import load_adapter_state

transformers = pytest.importorskip("transformers")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
PATCH, SIZE = 14, 28  # a 2x2 grid: 4 image tokens


def _row(rid, image, *turns):
    """LLaVA row; turns alternate human/gpt starting with human."""
    return {"id": rid, "image": image,
            "conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]}


def _write(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows))
    return path


def _good_rows():
    return [_row(name, f"img/{name}.png", "<image>\nWhat colour?", name.capitalize()) for name in COLOURS]


def _qwen(folder: Path, vocab: int, seed: int = 0) -> Path:
    from serve_fixtures import write_tokenizer

    folder.mkdir()
    write_tokenizer(folder)
    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, initializer_range=0.2, eos_token_id=2)
    torch.manual_seed(seed)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    from serve_fixtures import write_tokenizer

    vocab = write_tokenizer(root)  # the tokenizer's size: every row used, so <image> needs one more
    qwen = _qwen(root / "qwen", vocab)
    vision = root / "dinov2"
    torch.manual_seed(1)
    transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=SIZE, patch_size=PATCH,
        layerscale_value=0.5, initializer_range=0.2)).save_pretrained(vision)
    data = root / "data"
    (data / "img").mkdir(parents=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(data / "img" / f"{name}.png")
    (data / "img" / "garbage.png").write_bytes(b"this is not a png at all" * 10)
    rows = _good_rows()
    _write(data / "train.json", rows + [_row("gone", "img/missing.png", "<image>\nWhat colour?", "Red")])
    return SimpleNamespace(root=root, qwen=qwen, vision=vision, data=data, train_json=data / "train.json",
                           vocab=vocab)


@pytest.fixture(scope="module")
def base(parts):
    return assemble_llava(parts.qwen, parts.vision, parts.root / "base", image_size=SIZE)


@pytest.fixture(scope="module")
def tok(base):
    from pocketvlm.tokenizer import Tokenizer

    return Tokenizer.from_folder(base)


def _inputs(base, tok, name="red", text="What colour is this?"):
    """input_ids with the image expanded (through pocketvlm's own chat template) and pixel_values of
    ``data/img/<name>.png``, next to the model folder under the fixture's root."""
    from pocketvlm.image import ImageProcessorConfig

    model_cfg = json.loads((base / "config.json").read_text())
    enc = Encoder(tok, tok.chat_template, model_cfg["image_token_index"], model_cfg["image_seq_length"])
    ids = enc._ids(enc._render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                               True))
    proc = ImageProcessorConfig.from_dict(json.loads((base / "preprocessor_config.json").read_text()))
    image = load_image(str(Path(base).parent / "data" / "img" / f"{name}.png"))
    return torch.tensor([ids]), preprocess(image, proc).pixel_values


def _ours(folder):
    return loading.load_hf(Path(folder)).model.eval()


def _hf(folder):
    return transformers.LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


# --- assemble -------------------------------------------------------------------------------------------

def test_assemble_loads_in_pocketvlm_and_transformers(parts, base, tok):
    cfg = json.loads((base / "config.json").read_text())
    image_id = cfg["image_token_index"]
    assert image_id == parts.vocab and cfg["text_config"]["vocab_size"] == parts.vocab + 1  # one row grown
    assert tok.encode("<image>", add_special_tokens=False) == [image_id]
    assert tok.encode("a<image>\nb", add_special_tokens=False).count(image_id) == 1
    ours = _ours(base)
    assert ours.num_image_tokens() == (SIZE // PATCH) ** 2 == cfg["image_seq_length"]
    ids, pv = _inputs(base, tok)
    assert int((ids == image_id).sum()) == (SIZE // PATCH) ** 2
    hf = _hf(base)
    with torch.no_grad():
        got, ref = ours(ids, pixel_values=pv), hf(input_ids=ids, pixel_values=pv).logits
        other = ours(ids, pixel_values=_inputs(base, tok, "blue")[1])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert (other - got).abs().max() > 1e-3  # the image reaches the logits
    # transformers' own processor expands <image> to the same number of tokens
    proc = transformers.AutoProcessor.from_pretrained(base)
    enc = proc(text="<image>\nWhat?", images=Image.new("RGB", (40, 30), (1, 2, 3)), return_tensors="pt")
    assert int((enc["input_ids"] == image_id).sum()) == (SIZE // PATCH) ** 2
    torch.testing.assert_close(enc["pixel_values"].shape[-2:], torch.Size([SIZE, SIZE]))


def test_assemble_keeps_a_spare_row_and_resamples_positions(parts):
    # a vocabulary with spare rows: <image> takes the next id, no row is added
    qwen = _qwen(parts.root / "qwen_spare", parts.vocab + 16, seed=2)
    out = assemble_llava(qwen, parts.vision, parts.root / "base_spare", image_size=42)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["image_token_index"] == parts.vocab and cfg["text_config"]["vocab_size"] == parts.vocab + 16
    w = load_file(str(out / "model.safetensors"))
    assert w["model.language_model.embed_tokens.weight"].shape[0] == parts.vocab + 16
    # at 42 the saved 3x3 position grid gives what transformers' Dinov2Model interpolates on every call
    ours = _ours(out)
    assert ours.num_image_tokens() == 9
    pv = torch.randn(1, 3, 42, 42, generator=torch.Generator().manual_seed(0))
    hf = transformers.Dinov2Model.from_pretrained(parts.vision).eval()
    with torch.no_grad():
        ref = hf(pixel_values=pv, output_hidden_states=True).hidden_states[-1][:, 1:]
        torch.testing.assert_close(ours.image_hidden_states(pv), ref, atol=1e-5, rtol=0)


def test_assemble_bad_parts(parts, tmp_path):
    with pytest.raises(ConfigError, match="not a multiple of the tower's patch size 14"):
        assemble_llava(parts.qwen, parts.vision, tmp_path / "a", image_size=30)
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit", "patch_size": 14}))
    with pytest.raises(ConfigError, match="'vit' tower is not supported"):
        assemble_llava(parts.qwen, vit, tmp_path / "b", image_size=SIZE)
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "patch_size": 14,
                                                  "image_size": 336}))
    with pytest.raises(ConfigError, match=r"own image size \(336\), not 28: pass image_size=336"):
        assemble_llava(parts.qwen, clip, tmp_path / "c", image_size=SIZE)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_assemble_clip_and_siglip_towers(parts, tmp_path, kind):
    """Swapping the encoder: a CLIP or SigLIP tower makes a LLaVA that transformers and pocketvlm agree on."""
    vision = tmp_path / kind
    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
                patch_size=PATCH)
    torch.manual_seed(3)
    if kind == "clip":
        transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**dims, initializer_range=0.2)).save_pretrained(vision)
    else:
        transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**dims)).save_pretrained(vision)
    out = assemble_llava(parts.qwen, vision, tmp_path / "llava", image_size=SIZE, feature_layers=(-2,))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_config"]["model_type"] == f"{kind}_vision_model"
    assert cfg["vision_feature_select_strategy"] == ("default" if kind == "clip" else "full")
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["image_mean"][0] == (0.48145466 if kind == "clip" else 0.5)
    from pocketvlm.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(out)
    ours = _ours(out)
    assert ours.num_image_tokens() == (SIZE // PATCH) ** 2
    enc = Encoder(tok, tok.chat_template, cfg["image_token_index"], cfg["image_seq_length"])
    ids = torch.tensor([enc._ids(enc._render([{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": "What?"}]}], True))])
    pv = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ref = ours(ids, pixel_values=pv), _hf(out)(input_ids=ids, pixel_values=pv).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    proc = transformers.AutoProcessor.from_pretrained(out)
    enc = proc(text="<image>\nWhat?", images=Image.new("RGB", (40, 30), (1, 2, 3)), return_tensors="pt")
    assert int((enc["input_ids"] == cfg["image_token_index"]).sum()) == (SIZE // PATCH) ** 2


# --- labels ---------------------------------------------------------------------------------------------

def test_labels_are_exactly_the_answers(base, tok):
    ours = _ours(base)
    enc = Encoder(tok, tok.chat_template, ours.image_token_id, ours.num_image_tokens())
    msgs = to_messages([{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red"},
                        {"from": "human", "value": "Are you sure?"}, {"from": "gpt", "value": "Yes, red."}])
    ids, labels = enc.encode(msgs)
    assert len(ids) == len(labels)
    spans, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    spans += [cur] if cur else []
    assert [tok.decode(s) for s in spans] == ["Red<|im_end|>\n", "Yes, red.<|im_end|>\n"]
    # everything else (system, user turns, assistant headers, image slots) is IGNORE
    ignored = tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE and t != ours.image_token_id])
    assert ignored == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\nWhat colour?"
                       "<|im_end|>\n<|im_start|>assistant\n<|im_start|>user\nAre you sure?<|im_end|>\n"
                       "<|im_start|>assistant\n")
    slots = [i for i, t in enumerate(ids) if t == ours.image_token_id]
    assert len(slots) == ours.num_image_tokens() == 4 and slots == list(range(slots[0], slots[0] + 4))
    assert all(labels[i] == IGNORE for i in slots)
    # turn-by-turn tokens are the whole conversation's tokens
    assert ids == enc._ids(enc._render(msgs, False))


def test_independent_turns_learn_each_turn_exactly_as_asked_alone(base, tok):
    """Packed independent turns: the loss of the packed row equals the losses of each question asked alone
    with the image (what inference sees), and no answer token can attend to another turn."""
    ours = _ours(base)
    enc = Encoder(tok, tok.chat_template, ours.image_token_id, ours.num_image_tokens())
    turns = [("What colour?", "Red"), ("How many?", "1"), ("Is it a square? Say more.", "Yes, a red one.")]
    msgs = to_messages([{"from": "human" if i % 2 == 0 else "gpt", "value": ("<image>\n" if i == 0 else "") + v}
                        for i, v in enumerate(x for t in turns for x in t)])
    ids, labels, pos, seg = enc.encode_independent(msgs)
    assert len(ids) == len(labels) == len(pos) == len(seg) and sorted(set(seg)) == [0, 1, 2, 3]
    from pocketvlm.train.data import Sample, single_turns

    alone = [enc.encode(c) for c in single_turns(msgs)]
    p = seg.index(1)
    assert ours.image_token_id in ids[:p] and all(ids[:p] == a[:p] for a, _ in alone)
    for k, (a_ids, a_lab) in enumerate(alone, 1):   # each turn: its own tokens at its own positions
        assert [t for t, s in zip(ids, seg) if s == k] == a_ids[p:]
        assert [q for q, s in zip(pos, seg) if s == k] == list(range(p, len(a_ids)))
    image = load_image(str(Path(base).parent / "data" / "img" / "red.png"))
    from pocketvlm.image import ImageProcessorConfig

    proc = ImageProcessorConfig.from_dict(json.loads((base / "preprocessor_config.json").read_text()))
    with torch.no_grad():
        feats = ours.image_hidden_states(preprocess(image, proc).pixel_values)[0]
        packed, n = loop._step_loss(ours, Sample("p", Path("x"), ids, labels, pos, seg), feats, torch.float32, "cpu")
        singles = [loop._step_loss(ours, Sample("s", Path("x"), a, lab), feats, torch.float32, "cpu")
                   for a, lab in alone]
        chat, _ = loop._step_loss(ours, Sample("c", Path("x"), *enc.encode(msgs)), feats, torch.float32, "cpu")
    assert n == sum(c for _, c in singles)
    torch.testing.assert_close(packed, sum(x for x, _ in singles), atol=1e-4, rtol=0)
    assert abs(float(chat) - float(packed)) > 1e-3   # as one dialogue, later answers see earlier turns


def test_data_turns_option(parts, encoder):
    rows = [_row("m", "img/red.png", "<image>\nWhat colour?", "Red", "And the shape?", "Square")]
    path = _write(parts.data / "multi.json", rows)
    chat = load_dataset(path, encoder)
    packed = load_dataset(path, encoder, turns="independent")
    assert chat.samples[0].segments is None and packed.samples[0].segments is not None
    assert sum(t != IGNORE for t in chat.samples[0].labels) == sum(t != IGNORE for t in packed.samples[0].labels)
    with pytest.raises(ConfigError, match="turns must be one of chat, independent"):
        load_dataset(path, encoder, turns="parallel")


def test_image_token_is_never_predicted_by_the_assembled_base(base, tok):
    """The LM head's added <image> row is the mean of the others (transformers' resizing): its logit is the
    vocabulary's mean logit, below the top token at every position."""
    ours = _ours(base)
    ids, pv = _inputs(base, tok)
    with torch.no_grad():
        logits = ours(ids, pixel_values=pv)[0]
    assert bool((logits[:, ours.image_token_id] < logits.max(-1).values).all())
    torch.testing.assert_close(logits[:, ours.image_token_id], logits[:, :ours.image_token_id].mean(-1),
                               atol=1e-4, rtol=0)


def test_projector_calibration_starts_image_tokens_at_the_text_embedding_scale(parts, base):
    model = _ours(base)
    g = torch.Generator().manual_seed(3)
    feats = {str(i): torch.randn(4, 32, generator=g) * 7 + 3 for i in range(8)}   # far from unit scale
    got = loop.calibrate_projector(model, feats)
    x = torch.cat(list(feats.values()))
    with torch.no_grad():
        out = model.model.multi_modal_projector(x)
        pre = model.model.multi_modal_projector.linear_1(x)
        emb = model.get_input_embeddings()(torch.arange(parts.vocab)[None])[0]
    rms = out.pow(2).mean(-1).sqrt().median()
    target = emb.pow(2).mean(-1).sqrt().median()
    assert abs(float(rms) / float(target) - 1) < 0.1 and abs(got["image_token_rms"] / got["embedding_rms"] - 1) < 1e-4
    assert abs(float(pre.std()) - 1) < 0.2   # hidden units start near unit variance


# --- training -------------------------------------------------------------------------------------------

def _cfg(base, out, **kw):
    kw = {"stage": 1, "max_steps": 20, "batch_size": 4, "lr": 5e-2, "warmup": 0.0, "dtype": "float32",
          "progress": False, **kw}
    return TrainConfig(base=str(base), out=str(out), **kw)


def _log(out):
    return [json.loads(x) for x in (Path(out) / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stage1(parts, base):
    return train(_cfg(base, parts.root / "stage1", data=str(parts.train_json)))


@pytest.fixture(scope="module")
def stage2(parts, stage1):
    # from stage 1's output; float32: bf16 autocast is ~5x slower on these tiny shapes (the bf16 path runs in
    # test_resume_refuses_another_setup)
    return train(_cfg(stage1, parts.root / "stage2", data=str(parts.train_json), stage=2, lr=1e-2, lora_r=4,
                      max_steps=12,
                      lora_targets=("q_proj", "v_proj", "down_proj")))


def test_stage1_trains_only_the_projector(base, stage1):
    log = _log(stage1)
    assert [r["step"] for r in log] == list(range(1, 21))
    # the projector alone steers a random 2-layer decoder only so far (measured: 6.47 -> 5.09 in 20 steps,
    # a plateau near 4.9 by 40); every step is the whole data set, so the fall is steady, not noise
    losses = [r["loss"] for r in log]
    assert losses[-1] < 0.85 * losses[0] and all(b < a + 1e-3 for a, b in zip(losses, losses[1:])), losses
    tc = json.loads((stage1 / "train_config.json").read_text())
    assert tc["samples"] == 4 and tc["skipped"] == {"image file missing": 1}
    cal = tc["projector_calibration"]   # stage 1 starts from a projector calibrated on the data
    assert abs(cal["image_token_rms"] / cal["embedding_rms"] - 1) < 1e-4
    before, after = load_file(str(base / "model.safetensors")), load_file(str(stage1 / "model.safetensors"))
    assert before.keys() == after.keys()
    proj = load_file(str(stage1 / "projector.safetensors"))
    assert set(proj) == {k for k in before if "multi_modal_projector" in k}
    for k in before:
        if k in proj:
            assert not torch.equal(before[k], after[k]) and torch.equal(after[k], proj[k]), k
        else:
            assert torch.equal(before[k], after[k]), k
    assert not (stage1 / "adapter").exists() and (stage1 / "checkpoint.pt").exists()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (stage1 / name).read_text() == (base / name).read_text()


def test_stage2_output_is_base_plus_projector_plus_lora(stage1, stage2, tok):
    log = _log(stage2)
    assert [r["step"] for r in log] == list(range(1, 13))
    assert log[-1]["loss"] < 0.7 * log[0]["loss"], [r["loss"] for r in log]
    acfg = json.loads((stage2 / "adapter" / "adapter_config.json").read_text())
    assert (acfg["r"], acfg["lora_alpha"], acfg["target_modules"]) == (4, 16.0, ["down_proj", "q_proj", "v_proj"])
    adapter = load_file(str(stage2 / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 2 * 3 * 2  # A and B, 3 targets, 2 layers
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in adapter
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B trained away from zero
    # built here: stage 1's model, the trained projector, the LoRA layers (unmerged) with the saved tensors
    mine = _ours(stage1)
    proj = load_file(str(stage2 / "projector.safetensors"))
    mine.model.multi_modal_projector.load_state_dict({k.split("multi_modal_projector.")[1]: v for k, v in proj.items()})
    apply_lora(mine.model.language_model, acfg["target_modules"], acfg["r"], acfg["lora_alpha"])
    load_adapter_state(mine.model.language_model, adapter, prefix="model.language_model.")
    saved = _ours(stage2)
    ids, pv = _inputs(stage1, tok)
    with torch.no_grad():
        got, ref, before = saved(ids, pixel_values=pv), mine(ids, pixel_values=pv), _ours(stage1)(ids, pixel_values=pv)
        hf = _hf(stage2)(input_ids=ids, pixel_values=pv).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(got, hf, atol=1e-4, rtol=0)
    assert (got - before).abs().max() > 1e-3


def test_lora_with_zero_b_changes_nothing_and_merges_exactly(base, tok):
    model = _ours(base)
    ids, pv = _inputs(base, tok)
    with torch.no_grad():
        ref = model(ids, pixel_values=pv)
        found = apply_lora(model.model.language_model, ("q_proj", "gate_proj"), r=2, alpha=4)
        assert len(found) == 4
        torch.testing.assert_close(model(ids, pixel_values=pv), ref, atol=0, rtol=0)
        g = torch.Generator().manual_seed(0)
        for m in model.model.language_model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.5)
        unmerged = model(ids, pixel_values=pv)
        assert (unmerged - ref).abs().max() > 1e-3
        assert merge_lora(model.model.language_model) == 4
        assert not any(hasattr(m, "lora_B") for m in model.modules())
        torch.testing.assert_close(model(ids, pixel_values=pv), unmerged, atol=1e-5, rtol=0)


# --- resume ---------------------------------------------------------------------------------------------

def test_resume_continues_from_the_checkpoint(parts, base, tmp_path):
    out = tmp_path / "run"
    train(_cfg(base, out, data=str(parts.train_json), max_steps=4, save_every=2, batch_size=2))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 4
    train(_cfg(base, out, data=str(parts.train_json), max_steps=6, save_every=2, batch_size=2, resume=True))
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4, 5, 6]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 6


def test_resume_after_a_crash_equals_an_unbroken_run(parts, base, tmp_path, monkeypatch):
    kw = dict(data=str(parts.train_json), max_steps=5, save_every=2, batch_size=2)
    unbroken = train(_cfg(base, tmp_path / "a", **kw))
    real, calls = loop._step_loss, []

    def crash_in_step_4(*a, **k):  # steps 1-3 run (2 samples each), the checkpoint holds step 2
        calls.append(1)
        if len(calls) > 6:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "_step_loss", crash_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(base, tmp_path / "b", **kw))
    monkeypatch.setattr(loop, "_step_loss", real)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 2
    resumed = train(_cfg(base, tmp_path / "b", resume=True, **kw))
    assert [r["step"] for r in _log(resumed)] == [1, 2, 3, 3, 4, 5]  # step 3 ran again after the crash
    a, b = load_file(str(unbroken / "projector.safetensors")), load_file(str(resumed / "projector.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_resume_refuses_another_setup(parts, base, stage1, tmp_path):
    out = tmp_path / "run"
    kw = dict(data=str(parts.train_json), stage=2, max_steps=1, batch_size=1, lora_r=2)
    train(_cfg(base, out, **kw, dtype="bfloat16"))  # the frozen model in bf16 under autocast
    assert json.loads((out / "train_config.json").read_text())["compute_dtype"] == "torch.bfloat16"
    assert torch.isfinite(torch.tensor(_log(out)[0]["loss"]))
    with pytest.raises(ConfigError, match="another model, data or training setup"):
        train(_cfg(base, out, **{**kw, "lora_r": 4}, resume=True))
    # another base: stage 1's output has the same config.json as the assembled base, other weights
    with pytest.raises(ConfigError, match="another model, data or training setup"):
        train(_cfg(stage1, out, **kw, resume=True))


def test_projector_lr_is_the_projectors_own(parts, base, stage2, tmp_path):
    """``projector_lr`` sets the projector's learning rate apart: 0 keeps it exactly while the LoRA moves."""
    kw = dict(data=str(parts.train_json), stage=2, lora_r=4, max_steps=2, batch_size=4, lr=1e-2,
              lora_targets=("q_proj", "v_proj", "down_proj"), init_from=str(stage2))
    runs = [train(_cfg(base, tmp_path / f"p{i}", projector_lr=plr, **kw)) for i, plr in enumerate((0.0, None))]
    same = [[torch.equal(v, load_file(str(out / name))[k]) for k, v in load_file(str(stage2 / name)).items()]
            for out in runs for name in ("projector.safetensors", "adapter/adapter_model.safetensors")]
    assert all(same[0]) and not all(same[1]) and not all(same[2]) and not all(same[3])


def test_init_from_continues_a_stage2_run(parts, base, stage2, tmp_path):
    """Starting from stage 2's trained parts on the plain base, at lr 0, keeps them exactly; the first loss is
    stage 2's trained loss, far below a fresh adapter's."""
    kw = dict(data=str(parts.train_json), stage=2, lora_r=4, max_steps=1, batch_size=4,
              lora_targets=("q_proj", "v_proj", "down_proj"))
    out = train(_cfg(base, tmp_path / "cont", init_from=str(stage2), lr=0.0, **kw))
    for name in ("projector.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(stage2 / name)), load_file(str(out / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    fresh = train(_cfg(base, tmp_path / "fresh", lr=0.0, **kw))
    assert _log(out)[0]["loss"] < 0.5 * _log(fresh)[0]["loss"]
    # a recipe folder (adapter files at the top) works the same way
    from pocketvlm.train.recipe import write_recipe

    recipe = write_recipe(stage2, tmp_path / "recipe", llm="tiny", vision="tiny", dtype=torch.float32)
    assert json.loads((recipe / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    again = train(_cfg(base, tmp_path / "cont2", init_from=str(recipe), lr=0.0, **kw))
    assert _log(again)[0]["loss"] == pytest.approx(_log(out)[0]["loss"], rel=1e-5)


def test_init_from_refuses_what_does_not_fit(parts, base, stage1, stage2, tmp_path):
    kw = dict(data=str(parts.train_json), stage=2, lora_r=4, max_steps=1, batch_size=1,
              lora_targets=("q_proj", "v_proj", "down_proj"))
    with pytest.raises(ConfigError, match=r"holds LoRA r=4 alpha=16.0 .* asks for r=2"):
        train(_cfg(base, tmp_path / "a", init_from=str(stage2), **{**kw, "lora_r": 2}))
    with pytest.raises(ConfigError, match="is not a stage-2 output or recipe folder: missing .*adapter_model"):
        train(_cfg(base, tmp_path / "b", init_from=str(stage1), **kw))
    with pytest.raises(ConfigError, match="use it with stage 2"):
        train(_cfg(base, tmp_path / "c", init_from=str(stage2), **{**kw, "stage": 1}))
    with pytest.raises(ConfigError, match="would replace it"):
        train(_cfg(base, tmp_path / "d", init_from=str(stage2), projector_init="calibrate", **kw))


# --- bad input ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder(base, tok):
    ours = _ours(base)
    return Encoder(tok, tok.chat_template, ours.image_token_id, ours.num_image_tokens())


BAD_ROWS = {
    "image file missing": _row("a", "img/missing.png", "<image>\nWhat?", "Red"),
    "image file is not an image": _row("b", "img/garbage.png", "<image>\nWhat?", "Red"),
    "no <image> in the conversation": _row("c", "img/red.png", "What?", "Red"),
    "2 <image> placeholders (one image per conversation is supported)":
        _row("d", "img/red.png", "<image>\nWhat?", "Red", "<image>\nAnd this?", "Red"),
    "empty answer": _row("e", "img/red.png", "<image>\nWhat?", "  \n"),
    "turns must alternate human/gpt, starting with human and ending with gpt":
        {"id": "f", "image": "img/red.png", "conversations": [{"from": "gpt", "value": "Red"},
                                                              {"from": "human", "value": "<image>\nWhat?"}]},
    "<image> in an answer": _row("g", "img/red.png", "What?", "<image>"),
    "no image path": {"id": "h", "conversations": _row("h", "", "<image>\nWhat?", "Red")["conversations"]},
    "conversation has fewer than two turns": _row("i", "img/red.png", "<image>\nWhat?"),
    "turn 1 is not {'from': 'human'|'gpt', 'value': ...}":
        {"id": "j", "image": "img/red.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                              {"from": "bot", "value": "Red"}]},
}


@pytest.mark.parametrize("reason", list(BAD_ROWS))
def test_a_bad_row_is_skipped_with_its_reason(parts, encoder, reason):
    path = _write(parts.data / f"bad_{BAD_ROWS[reason]['id']}.json", [BAD_ROWS[reason]] + _good_rows()[:1])
    ds = load_dataset(path, encoder)
    assert [s.id for s in ds.samples] == ["red"]
    assert dict(ds.skipped) == {reason: 1}
    assert reason in ds.report()


def test_bad_data_files(parts, encoder):
    path = _write(parts.data / "all_bad.json", list(BAD_ROWS.values()))
    with pytest.raises(DataError, match="no usable training sample") as e:
        load_dataset(path, encoder)
    assert "image file missing" in str(e.value) and "empty answer" in str(e.value)
    (parts.data / "broken.json").write_text('[{"id": "x", "image": ')
    with pytest.raises(DataError, match="is not valid LLaVA JSON"):
        load_dataset(parts.data / "broken.json", encoder)
    _write(parts.data / "dict.json", {"id": "x"})
    with pytest.raises(DataError, match="expected a JSON list"):
        load_dataset(parts.data / "dict.json", encoder)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(parts.data / "nope.json", encoder)


def test_bad_training_setups(parts, base, tmp_path):
    data = str(parts.train_json)
    with pytest.raises(ConfigError, match="stage must be 1 .* or 2"):
        train(_cfg(base, tmp_path / "a", data=data, stage=3))
    with pytest.raises(ConfigError) as e:
        train(_cfg(base, tmp_path / "b", data=data, stage=2, lora_targets=("qkv_proj",)))
    assert "'qkv_proj' match no linear layer" in str(e.value)
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in str(e.value)
    with pytest.raises(ConfigError, match="LoRA rank must be >= 1"):
        train(_cfg(base, tmp_path / "c", data=data, stage=2, lora_r=0))
    with pytest.raises(ConfigError, match="projector_init must be auto, calibrate, keep, got 'zero'"):
        train(_cfg(base, tmp_path / "p", data=data, projector_init="zero"))
    with pytest.raises(ConfigError, match="training dtype must be auto, float32 or bfloat16"):
        train(_cfg(base, tmp_path / "d", data=data, dtype="float8"))
    with pytest.raises(ConfigError, match="is not a LLaVA model"):
        train(_cfg(parts.qwen, tmp_path / "e", data=data))


def test_cli_missing_data_file(base, tmp_path, capsys):
    rc = cli.main(["train", str(base), "--data", str(tmp_path / "nope.json"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: training data") and "nope.json does not exist" in err and "\n" not in err
    rc = cli.main(["train", "--data", str(tmp_path / "nope.json"), "-o", str(tmp_path / "o")])
    assert rc == 2 and "give a LLaVA folder to train, or --llm and --vision" in capsys.readouterr().err


# --- CLI ------------------------------------------------------------------------------------------------

def test_cli_assembles_and_trains(parts, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--llm", str(parts.qwen), "--vision", str(parts.vision), "--image-size", str(SIZE),
            "--data", str(parts.train_json), "-o", str(out), "--stage", "1", "--max-steps", "2",
            "--batch-size", "2", "--dtype", "float32"]
    rc = cli.main(args)
    assert rc == 0, capsys.readouterr().err
    assert "trained model:" in capsys.readouterr().out
    assert (out / "base" / "config.json").exists() and (out / "base" / "model.safetensors").exists()
    for name in ("model.safetensors", "projector.safetensors", "train_log.jsonl", "checkpoint.pt",
                 "train_config.json", "config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (out / name).exists(), name
    assert [r["step"] for r in _log(out)] == [1, 2]
    tc = json.loads((out / "train_config.json").read_text())
    assert (tc["stage"], tc["lr"], tc["base"]) == (1, 1e-3, str(out / "base"))
    assert _ours(out).num_image_tokens() == 4
    # --resume re-assembles OUT/base (seeded: the same parts) and continues from the checkpoint
    args[args.index("--max-steps") + 1] = "3"
    assert cli.main(args + ["--resume"]) == 0, capsys.readouterr().err
    assert "resumed at step 2 of 3" in capsys.readouterr().out
    assert [r["step"] for r in _log(out)] == [1, 2, 3]
