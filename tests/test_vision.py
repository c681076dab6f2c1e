"""CLIP and SigLIP vision encoders against transformers' CLIPVisionModel / SiglipVisionModel (tiny random
configs saved with save_pretrained, loaded through pocketvlm.loading)."""
from __future__ import annotations

import pytest
import torch

from pocketvlm import loading
from pocketvlm.errors import ConfigError, ImageError
from pocketvlm.models import clip, siglip

transformers = pytest.importorskip("transformers")

TINY = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4)
ATOL = 1e-4


def _randomize(model, seed):
    # HF initialises LayerNorms to (1, 0) and some biases to 0: random values make the parity test bite.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(noise + 1 if "norm" in name and name.endswith("weight") else noise)
    return model


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
    torch.manual_seed(0)
    hf = _randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY)), 1).eval()
    d = tmp_path_factory.mktemp("clip")
    hf.save_pretrained(d)
    return hf, loading.load(d)


@pytest.fixture(scope="module")
def siglip_pair(tmp_path_factory):
    torch.manual_seed(0)
    hf = _randomize(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY)), 2).eval()
    d = tmp_path_factory.mktemp("siglip")
    hf.save_pretrained(d)
    return hf, loading.load(d)


def _pixels(h=32, w=32, n=2, seed=3):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_loaded_families(clip_pair, siglip_pair):
    assert clip_pair[1].family is clip and isinstance(clip_pair[1].model, clip.Model)
    assert siglip_pair[1].family is siglip and isinstance(siglip_pair[1].model, siglip.Model)


@pytest.mark.parametrize("layer", [0, 1, -2, -1])
def test_clip_hidden_states(clip_pair, layer):
    hf, ours = clip_pair[0], clip_pair[1].model
    x = _pixels()
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True).hidden_states
        assert len(ref) == TINY["num_hidden_layers"] + 1
        got = ours(x, output_layer=layer)
    torch.testing.assert_close(got, ref[layer], atol=ATOL, rtol=0)


def test_clip_pooled_and_features(clip_pair):
    hf, ours = clip_pair[0], clip_pair[1].model
    x = _pixels()
    with torch.no_grad():
        out = hf(x, output_hidden_states=True)
        torch.testing.assert_close(ours.pooled(x), out.pooler_output, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours(x, -1), out.last_hidden_state, atol=ATOL, rtol=0)
        feats = ours.features(x, -2, "default")
        torch.testing.assert_close(feats, out.hidden_states[-2][:, 1:], atol=ATOL, rtol=0)
        assert ours.features(x, -2, "full").shape[1] == 17
    assert feats.shape[1] == ours.num_features("default") == 16
    assert ours.num_features("full") == 17


@pytest.mark.parametrize("hw", [(48, 48), (32, 64)])
def test_clip_interpolated_positions(clip_pair, hw):
    hf, ours = clip_pair[0], clip_pair[1].model
    x = _pixels(*hw)
    with torch.no_grad():
        ref = hf(x, interpolate_pos_encoding=True, output_hidden_states=True)
        got = ours(x, -1, interpolate_pos_encoding=True)
    torch.testing.assert_close(got, ref.last_hidden_state, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layer", [0, -2, -1])
def test_siglip_hidden_states(siglip_pair, layer):
    hf, ours = siglip_pair[0], siglip_pair[1].model
    x = _pixels()
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True).hidden_states
        got = ours(x, output_layer=layer)
    torch.testing.assert_close(got, ref[layer], atol=ATOL, rtol=0)


def test_siglip_post_layernorm_and_pooling_head(siglip_pair):
    hf, ours = siglip_pair[0], siglip_pair[1].model
    x = _pixels()
    with torch.no_grad():
        out = hf(x)
        torch.testing.assert_close(ours.last_hidden_state(x), out.last_hidden_state, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.pooled(x), out.pooler_output, atol=ATOL, rtol=0)
    assert ours.features(x).shape[1] == ours.num_features() == 16  # no class token


@pytest.mark.parametrize("hw", [(48, 48), (64, 32), (24, 40)])
def test_siglip_interpolated_positions(siglip_pair, hw):
    hf, ours = siglip_pair[0], siglip_pair[1].model
    x = _pixels(*hw)
    with torch.no_grad():
        ref = hf(x, interpolate_pos_encoding=True)
        torch.testing.assert_close(ours.last_hidden_state(x, interpolate_pos_encoding=True), ref.last_hidden_state,
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.pooled(x, interpolate_pos_encoding=True), ref.pooler_output,
                                   atol=ATOL, rtol=0)


def test_bfloat16(siglip_pair, tmp_path):
    hf = siglip_pair[0]
    hf.save_pretrained(tmp_path)
    ours = loading.load(tmp_path, dtype="bfloat16").model
    x = _pixels()
    with torch.no_grad():
        got = ours.last_hidden_state(x.bfloat16())
        ref = hf(x).last_hidden_state
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=0.1, rtol=0.05)


def test_wrong_resolution_without_interpolation(clip_pair, siglip_pair):
    for pair in (clip_pair, siglip_pair):
        with pytest.raises(ImageError, match="48x48"):
            pair[1].model(_pixels(48, 48))
    with pytest.raises(ImageError, match="batch, channels"):
        clip_pair[1].model(torch.zeros(3, 32, 32))


def test_bad_layer_and_strategy(clip_pair):
    ours = clip_pair[1].model
    with pytest.raises(ConfigError, match="out of range"):
        ours(_pixels(), output_layer=-5)
    with pytest.raises(ConfigError, match="select_strategy"):
        ours.features(_pixels(), -2, "cls_only")


def test_bad_config():
    with pytest.raises(ConfigError, match="hidden_act"):
        clip.Config.from_dict({**TINY, "hidden_act": "swish"})
    with pytest.raises(ConfigError, match="patch_size"):
        siglip.Config.from_dict({k: v for k, v in TINY.items() if k != "patch_size"})


def test_siglip_without_head(tmp_path):
    hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY, vision_use_head=False)).eval()
    hf.save_pretrained(tmp_path)
    ours = loading.load(tmp_path).model
    assert not hasattr(ours.vision_model, "head")
    with pytest.raises(ConfigError, match="pooling head"):
        ours.pooled(_pixels())
