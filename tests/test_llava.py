"""LLaVA and LLaVA-OneVision against transformers (tiny random models saved with save_pretrained, loaded by
pocketvlm): fp32 logits with one and two images of several sizes, prompt expansion counts vs HF's
processors, checkpoint layouts, cached decode after an image prefill. Pixel values come from
pocketvlm.image.preprocess and are fed to both models."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pocketvlm import loading
from pocketvlm.errors import ConfigError, ImageError
from pocketvlm.image import ImageProcessorConfig, preprocess
from pocketvlm.models import llava, llava_onevision

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

VOCAB, IMG, VID = 128, 100, 101
ATOL = 1e-4
CLIP = dict(model_type="clip_vision_model", image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
            num_hidden_layers=3, num_attention_heads=4)
SIGLIP = dict(CLIP, model_type="siglip_vision_model")
_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
TEXT = {"llama": dict(_TEXT, model_type="llama"),
        "qwen2": dict(_TEXT, model_type="qwen2"),
        "phi3": dict(_TEXT, model_type="phi3", pad_token_id=0)}
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32], [128, 128]]
SIZES = {"square": (40, 40), "wide": (30, 96), "tall": (90, 30), "tiny": (5, 7), "large": (150, 200)}


def _image(hw, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(noise + 1 if "norm" in name and name.endswith("weight") else noise)
    return model


def _save(hf, path):
    hf.save_pretrained(path)
    return loading.load(path)


def _ids(n_tokens, seed=0, text=(3, 4, 5, 6)):
    """A prompt with one image slot per entry of n_tokens, between text tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = []
    for n in n_tokens:
        ids += torch.randint(1, 90, (len(text),), generator=g).tolist() + [IMG] * n
    return torch.tensor([ids + [7, 8]])


# --- LLaVA ------------------------------------------------------------------------------------------

_llava_cache = {}


@pytest.fixture(scope="module")
def llava_models(tmp_path_factory):
    def get(text):
        if text not in _llava_cache:
            torch.manual_seed(0)
            cfg = transformers.LlavaConfig(vision_config=CLIP, text_config=TEXT[text], image_token_index=IMG)
            hf = _randomize(transformers.LlavaForConditionalGeneration(cfg), 1).eval()
            _llava_cache[text] = (hf, _save(hf, tmp_path_factory.mktemp(f"llava_{text}")).model)
        return _llava_cache[text]
    return get


@functools.lru_cache(maxsize=1)
def _llava_processor():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(90)} | {"<image>": IMG, "<unk>": 99}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(["<image>"])  # the processor writes "<image><image>..." without spaces
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    ip = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return transformers.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, image_token="<image>",
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1)


@pytest.mark.parametrize("text,names", [
    ("llama", ["square"]), ("llama", ["wide"]), ("llama", ["tall", "tiny"]), ("llama", ["wide", "square"]),
    ("qwen2", ["tall"]), ("qwen2", ["tiny", "wide"]), ("phi3", ["square"]), ("phi3", ["wide", "tall"])])
def test_llava_logits(llava_models, text, names):
    hf, ours = llava_models(text)
    imgs = [_image(SIZES[n], i) for i, n in enumerate(names)]
    pv = torch.cat([preprocess(im, ImageProcessorConfig.clip(32)).pixel_values for im in imgs])
    n_tok = ours.num_image_tokens(imgs[0].size[::-1])
    prompt = " ".join("w3 w4 w5 <image>" for _ in imgs) + " w7 w8"
    hf_ids = _llava_processor()(text=prompt, images=imgs, return_tensors="pt").input_ids
    ids = torch.tensor([[t for _ in imgs for t in [3, 4, 5] + [IMG] * n_tok] + [7, 8]])
    assert torch.equal(ids, hf_ids), "num_image_tokens disagrees with LlavaProcessor's expansion"
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pv).logits
        got = ours(ids, pixel_values=pv)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_llava_cached_decode_after_image_prefill(llava_models):
    hf, ours = llava_models("llama")
    pv = preprocess(_image(SIZES["wide"], 0), ImageProcessorConfig.clip(32)).pixel_values
    ids = _ids([ours.num_image_tokens()])
    new = torch.tensor([[11, 12, 13]])
    with torch.no_grad():
        emb = ours.embed(torch.cat([ids, new], 1), ours.encode_images(pv))
        full = ours(inputs_embeds=emb)
        S = ids.shape[1]
        cache = ours.make_cache(1, 64)
        outs = [ours(inputs_embeds=emb[:, :S], input_pos=torch.arange(S), cache=cache)]
        for i in range(new.shape[1]):
            outs.append(ours(new[:, i:i + 1], input_pos=torch.tensor([S + i]), cache=cache))
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=ATOL, rtol=0)
        ref = hf(input_ids=torch.cat([ids, new], 1), pixel_values=pv).logits
        torch.testing.assert_close(full, ref, atol=ATOL, rtol=0)


def test_llava_checkpoint_layouts(llava_models, tmp_path):
    """transformers-5 module names and the hub's vision_tower.vision_model.* both map to the same state dict."""
    hf, ours = llava_models("qwen2")
    d = json.loads(json.dumps(hf.config.to_dict()))
    cfg = llava.Config.from_dict(d)
    expected = {k: v for k, v in ours.state_dict().items()}
    module_names = hf.state_dict()  # model.vision_tower.embeddings..., model.language_model..., lm_head
    hub = {}
    for k, v in module_names.items():
        k = k.replace("model.vision_tower.", "vision_tower.vision_model.").replace("model.multi_modal_projector.",
                                                                                     "multi_modal_projector.")
        k = k.replace("model.language_model.", "language_model.model.").replace("lm_head.", "language_model.lm_head.")
        hub[k] = v
    for layout in (module_names, hub):
        got = llava.sanitize(dict(layout), cfg)
        assert sorted(got) == sorted(expected)
        assert all(torch.equal(got[k], expected[k]) for k in got)
    save_file({k: v.contiguous() for k, v in hub.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(d))
    loaded = loading.load(tmp_path).model
    ids = _ids([ours.num_image_tokens()])
    pv = preprocess(_image(SIZES["square"], 0), ImageProcessorConfig.clip(32)).pixel_values
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, pixel_values=pv), ours(ids, pixel_values=pv), atol=0, rtol=0)


def test_llava_tied_embeddings_and_image_token_id(tmp_path):
    cfg = transformers.LlavaConfig(vision_config=SIGLIP, text_config=dict(TEXT["qwen2"], tie_word_embeddings=True),
                                   image_token_index=IMG, vision_feature_layer=-1,
                                   vision_feature_select_strategy="full")
    hf = _randomize(transformers.LlavaForConditionalGeneration(cfg), 4).eval()
    hf.tie_weights()
    ours = _save(hf, tmp_path).model
    assert ours.lm_head.weight is ours.get_input_embeddings().weight
    assert ours.image_token_id == IMG and ours.num_image_tokens() == 16
    ids = _ids([16])
    pv = preprocess(_image(SIZES["tall"], 1), ImageProcessorConfig.siglip(32)).pixel_values
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pixel_values=pv), hf(input_ids=ids, pixel_values=pv).logits,
                                   atol=ATOL, rtol=0)
    d = json.loads((tmp_path / "config.json").read_text())
    d.pop("image_token_index")
    assert llava.Config.from_dict({**d, "image_token_id": 77}).image_token_index == 77


def test_llava_bad_inputs(llava_models):
    _, ours = llava_models("llama")
    pv = preprocess(_image(SIZES["square"], 0), ImageProcessorConfig.clip(32)).pixel_values
    with pytest.raises(ImageError, match="image tokens"):
        ours.embed(_ids([5]), ours.encode_images(pv))
    with pytest.raises(ImageError, match="no pixel_values"):
        ours(_ids([16]))
    good = {"model_type": "llava", "vision_config": CLIP, "text_config": TEXT["llama"]}
    with pytest.raises(ConfigError, match="vision_config"):
        llava.Config.from_dict({"model_type": "llava", "text_config": TEXT["llama"]})
    with pytest.raises(ConfigError, match="unsupported vision tower"):
        llava.Config.from_dict({**good, "vision_config": dict(CLIP, model_type="vit")})
    with pytest.raises(ConfigError, match="select_strategy"):
        llava.Config.from_dict({**good, "vision_feature_select_strategy": "patch"})


def test_llava_multi_layer_features(tmp_path):
    cfg = transformers.LlavaConfig(vision_config=CLIP, text_config=TEXT["llama"], image_token_index=IMG,
                                   vision_feature_layer=[-3, -1], projector_hidden_act="gelu")
    hf = _randomize(transformers.LlavaForConditionalGeneration(cfg), 5).eval()
    ours = _save(hf, tmp_path).model
    ids = _ids([16])
    pv = preprocess(_image(SIZES["square"], 2), ImageProcessorConfig.clip(32)).pixel_values
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pixel_values=pv), hf(input_ids=ids, pixel_values=pv).logits,
                                   atol=ATOL, rtol=0)


# --- LLaVA-OneVision --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlavaOnevisionConfig(vision_config=SIGLIP, text_config=TEXT["qwen2"], image_token_index=IMG,
                                            video_token_index=VID, image_grid_pinpoints=PINPOINTS)
    hf = _randomize(transformers.LlavaOnevisionForConditionalGeneration(cfg), 3).eval()
    return hf, _save(hf, tmp_path_factory.mktemp("onevision")).model


def _ov_processor_config():
    ip = transformers.LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS,
                                                   image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return ip, ImageProcessorConfig.from_dict(ip.to_dict())


def _hf_ov_count(ip, image_sizes, batch_num_images, idx):
    """HF's LlavaOnevisionProcessor.replace_image_token (built without its torchvision video processor)."""
    proc = object.__new__(transformers.LlavaOnevisionProcessor)
    proc.image_processor, proc.num_image_tokens = ip, 16
    proc.vision_feature_select_strategy, proc.vision_aspect_ratio, proc.image_token = "full", "anyres_max_9", "<I>"
    inputs = {"batch_num_images": batch_num_images, "image_sizes": image_sizes,
              "pixel_values": [[torch.zeros(3, 32, 32)]]}
    return len(proc.replace_image_token(inputs, idx)) // 3


@pytest.mark.parametrize("names,multi", [(["square"], False), (["wide"], False), (["tall"], False),
                                         (["tiny"], False), (["large"], False), (["wide", "tall"], False),
                                         (["large", "tiny"], True)])
def test_onevision_logits(onevision, names, multi):
    hf, ours = onevision
    ip, pcfg = _ov_processor_config()
    imgs = [_image(SIZES[n], i) for i, n in enumerate(names)]
    pre = [preprocess(im, pcfg) for im in imgs]
    sizes = [p.image_size for p in pre]
    batch_num = [len(imgs)] if multi else [1] * len(imgs)
    counts = [ours.num_image_tokens(s, multi_image=multi) for s in sizes]
    assert counts == [_hf_ov_count(ip, sizes, batch_num, i) for i in range(len(imgs))]
    ids = _ids(counts)
    tiles = [p.pixel_values[:1] if multi else p.pixel_values for p in pre]
    assert [t.shape[0] for t in tiles] == [1 if multi else ours.num_tiles(s) for s in sizes]
    n_max = max(t.shape[0] for t in tiles)
    padded = torch.stack([torch.cat([t, t.new_zeros(n_max - t.shape[0], *t.shape[1:])]) for t in tiles])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=padded, image_sizes=torch.tensor(sizes),
                 batch_num_images=torch.tensor(batch_num)).logits
        feats = ours.encode_images(tiles, image_sizes=sizes, multi_image=multi)
        assert [f.shape[0] for f in feats] == counts
        got = ours(inputs_embeds=ours.embed(ids, feats))
        # HF's padded 5-D batch gives the same features
        torch.testing.assert_close(torch.cat(ours.encode_images(padded, sizes, multi)), torch.cat(feats))
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_onevision_downscales_large_grids(onevision):
    _, ours = onevision
    # 4x4 tiles of 4x4 patches = 16x16 > 9 tiles' worth: bilinear shrink to 12x12 (+12 newlines) + 16 base
    assert ours.num_image_tokens((150, 150)) == 16 + 12 * 13


def test_onevision_cached_decode(onevision):
    _, ours = onevision
    _, pcfg = _ov_processor_config()
    pre = preprocess(_image(SIZES["wide"], 0), pcfg)
    ids = _ids([ours.num_image_tokens(pre.image_size)])
    new = torch.tensor([[21, 22]])
    with torch.no_grad():
        emb = ours.embed(torch.cat([ids, new], 1), ours.encode_images(pre.pixel_values, [pre.image_size]))
        full = ours(inputs_embeds=emb)
        S = ids.shape[1]
        cache = ours.make_cache(1, 128)
        outs = [ours(inputs_embeds=emb[:, :S], input_pos=torch.arange(S), cache=cache)]
        for i in range(new.shape[1]):
            outs.append(ours(new[:, i:i + 1], input_pos=torch.tensor([S + i]), cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=ATOL, rtol=0)


def test_onevision_bad_inputs(onevision):
    _, ours = onevision
    _, pcfg = _ov_processor_config()
    pre = preprocess(_image(SIZES["large"], 0), pcfg)
    with pytest.raises(ImageError, match="image_sizes"):
        ours.encode_images(pre.pixel_values)
    with pytest.raises(ImageError, match="tiles"):
        ours.encode_images(pre.pixel_values[:3], [pre.image_size])
    with pytest.raises(ImageError, match="image sizes"):
        ours.encode_images([pre.pixel_values], [pre.image_size, pre.image_size])
    d = {"model_type": "llava_onevision", "vision_config": SIGLIP, "text_config": TEXT["qwen2"]}
    with pytest.raises(ConfigError, match="image_grid_pinpoints"):
        llava_onevision.Config.from_dict(d)
    with pytest.raises(ConfigError, match="vision_aspect_ratio"):
        llava_onevision.Config.from_dict({**d, "image_grid_pinpoints": PINPOINTS, "vision_aspect_ratio": "pad"})


# --- MobileVLM (no transformers implementation: checked against an explicit composition) ---------------

@pytest.fixture(scope="module", params=["ldpnet", "ldpnetv2"])
def mobilevlm(request, tmp_path_factory):
    from pocketvlm.models.projectors import build_projector

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp(f"mobilevlm_{request.param}")
    vcfg = {k: v for k, v in CLIP.items() if k != "model_type"}
    tower = _randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vcfg)), 6).eval()
    tower.save_pretrained(root / "clip")  # mm_vision_tower names this local folder, as their code allows
    text = _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT["llama"])), 7).eval()
    proj = _randomize(build_projector(request.param, 32, 32), 8).eval()
    weights = dict(text.state_dict())
    weights |= {"model.vision_tower.vision_tower.vision_model." + k: v for k, v in tower.state_dict().items()}
    weights |= {"model.mm_projector." + k: v for k, v in proj.state_dict().items()}
    d = root / "mobilevlm"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(d / "model.safetensors"))
    cfg = {**text.config.to_dict(), "model_type": "mobilevlm", "architectures": ["MobileLlamaForCausalLM"],
           "mm_vision_tower": str(root / "clip"), "mm_projector_type": request.param, "mm_hidden_size": 32,
           "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "vision_tower_type": "clip",
           "image_aspect_ratio": "pad", "use_mm_proj": True}
    (d / "config.json").write_text(json.dumps(cfg))
    return tower, text, proj, loading.load(d).model


def test_mobilevlm_logits_equal_composition(mobilevlm):
    tower, text, proj, ours = mobilevlm
    imgs = [_image(SIZES["wide"], 0), _image(SIZES["tiny"], 1)]
    pcfg = ours.default_image_processor()
    assert pcfg.do_pad and pcfg.crop_size == (32, 32)
    pv = torch.cat([preprocess(im, pcfg).pixel_values for im in imgs])
    n = ours.num_image_tokens()
    pre, mid, post = [3, 4, 5], [6, 7], [8, 9]
    ids = torch.tensor([pre + [-200] * n + mid + [-200] * n + post])
    with torch.no_grad():
        feats = proj(tower(pv, output_hidden_states=True).hidden_states[-2][:, 1:])  # the original's encode_images
        assert feats.shape[1] == n
        emb = text.get_input_embeddings()
        # the original replaces each single -200 with the image's feature rows
        ref_emb = torch.cat([emb(torch.tensor(pre)), feats[0], emb(torch.tensor(mid)), feats[1],
                             emb(torch.tensor(post))])[None]
        ref = text(inputs_embeds=ref_emb).logits
        got = ours(ids, pixel_values=pv)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_mobilevlm_config():
    from pocketvlm.models import mobilevlm

    base_cfg = {**TEXT["llama"], "model_type": "mobilevlm", "mm_projector_type": "ldpnetv2"}
    real = mobilevlm.Config.from_dict({**base_cfg, "mm_vision_tower": "openai/clip-vit-large-patch14-336"})
    assert (real.vision_config.image_size, real.vision_config.patch_size, real.vision_config.num_hidden_layers) \
        == (336, 14, 24)
    with pytest.raises(ConfigError, match="unknown MobileVLM vision tower"):
        mobilevlm.Config.from_dict({**base_cfg, "mm_vision_tower": "someone/other-tower"})
    with pytest.raises(ConfigError, match="mm_vision_tower"):
        mobilevlm.Config.from_dict(base_cfg)
    with pytest.raises(ConfigError, match="mm_vision_select_feature"):
        mobilevlm.Config.from_dict({**base_cfg, "vision_config": CLIP, "mm_vision_select_feature": "mtcv-2"})
