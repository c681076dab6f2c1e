"""Projectors: MobileVLM's ldp/ldpv2 against a golden fixture made by MobileVLM's own code
(scripts/make_mobilevlm_golden.py), mlp2x_gelu against transformers' LLaVA projectors, token counts,
the registry and bad inputs."""
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pocketvlm.errors import ConfigError, UnsupportedArchitectureError
from pocketvlm.models.projectors import (
    LDPProjector, LDPv2Projector, LinearProjector, MLPGeluProjector, build_projector,
)

GOLDEN = Path(__file__).parent / "data" / "mobilevlm_projectors.safetensors"
PREFIX = "model.mm_projector."
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN))


def _checkpoint_weights(golden, kind):
    """The projector's weights as a MobileVLM checkpoint names them, prefix stripped."""
    head = f"{kind}.{PREFIX}"
    return {k[len(head):]: v for k, v in golden.items() if k.startswith(head)}


def test_golden_fixture_records_upstream():
    with safe_open(str(GOLDEN), "pt") as f:
        meta = f.metadata()
    assert meta["upstream"].startswith("Meituan-AutoML/MobileVLM")
    assert len(meta["commit"]) == 40


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,cls", [("ldp", LDPProjector), ("ldpv2", LDPv2Projector)])
def test_mobilevlm_projector_matches_original_code(golden, kind, cls, device):
    x, expected = golden["input"], golden[f"{kind}.output"]
    proj = build_projector(kind, x.shape[-1], expected.shape[-1], device=device)
    assert isinstance(proj, cls)
    # strict: every checkpoint key has a parameter of the same name and shape, and vice versa
    proj.load_state_dict(_checkpoint_weights(golden, kind), strict=True)
    with torch.no_grad():
        out = proj(x.to(device)).cpu()
    assert out.shape == expected.shape == (2, 144, 48)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_ldp_golden_is_sensitive_to_the_mobile_blocks(golden):
    # Guards the golden test itself: a wrong SE or LayerNorm weight must show in the output.
    proj = LDPProjector(64, 48)
    weights = _checkpoint_weights(golden, "ldp")
    weights["model.mb_block.2.block.1.fc2.bias"] = weights["model.mb_block.2.block.1.fc2.bias"] + 0.5
    proj.load_state_dict(weights)
    with torch.no_grad():
        out = proj(golden["input"])
    assert (out - golden["ldp.output"]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
@pytest.mark.parametrize("feature_layers,bias", [(-2, True), ([-2, -5], False)])
def test_mlp2x_gelu_matches_transformers(family, feature_layers, bias):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaOnevisionConfig, SiglipVisionConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionMultiModalProjector

    text = LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    if family == "llava":
        cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4), text_config=text,
                          vision_feature_layer=feature_layers, multimodal_projector_bias=bias)
        ref = LlavaMultiModalProjector(cfg)
    else:
        cfg = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4),
                                   text_config=text, vision_feature_layer=feature_layers,
                                   multimodal_projector_bias=bias)
        ref = LlavaOnevisionMultiModalProjector(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    n_layers = 1 if isinstance(feature_layers, int) else len(feature_layers)
    proj = build_projector("mlp2x_gelu", 32 * n_layers, 48, hidden_act=cfg.projector_hidden_act, bias=bias)
    proj.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 7, 32 * n_layers)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), ref(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind,tokens_in,tokens_out", [
    ("ldp", 576, 144), ("ldpv2", 576, 144),   # CLIP ViT-L/14 at 336 px
    ("ldp", 729, 196), ("ldpv2", 729, 144),   # SigLIP 27x27: ldp halves the side (rounding up), v2 pools to 12x12
    ("mlp2x_gelu", 576, 576), ("linear", 576, 576),
])
def test_token_counts(kind, tokens_in, tokens_out):
    proj = build_projector(kind, 40, 32)
    with torch.no_grad():
        out = proj(torch.randn(1, tokens_in, 40))
    assert out.shape == (1, tokens_out, 32)


def test_registry_names_aliases_and_depths():
    assert isinstance(build_projector("linear", 8, 16), LinearProjector)
    assert sorted(build_projector("linear", 8, 16).state_dict()) == ["bias", "weight"]
    assert isinstance(build_projector("ldpnet", 8, 16), LDPProjector)
    assert isinstance(build_projector("ldpnetv2", 8, 16), LDPv2Projector)
    mlp3 = build_projector("mlp3x_gelu", 8, 16)
    assert isinstance(mlp3, MLPGeluProjector)
    assert sorted(mlp3.state_dict()) == [f"linear_{i}.{p}" for i in (1, 2, 3) for p in ("bias", "weight")]
    assert mlp3.linear_1.weight.shape == (16, 8) and mlp3.linear_3.weight.shape == (16, 16)


def test_mlp3x_gelu_computes_linear_gelu_chain():
    proj = build_projector("mlp3x_gelu", 8, 16)
    x = torch.randn(3, 8)
    gelu = torch.nn.functional.gelu
    expected = proj.linear_3(gelu(proj.linear_2(gelu(proj.linear_1(x)))))
    torch.testing.assert_close(proj(x), expected)


@pytest.mark.parametrize("name", ["ldp3", "mlp2x_relu", "mlp", "LDP", ""])
def test_unknown_projector_lists_supported(name):
    with pytest.raises(UnsupportedArchitectureError) as err:
        build_projector(name, 8, 16)
    msg = str(err.value)
    for known in ("linear", "mlpNx_gelu", "ldp", "ldpv2", "ldpnet", "ldpnetv2"):
        assert known in msg


def test_mlp_depth_zero_rejected():
    with pytest.raises(UnsupportedArchitectureError, match="N >= 1"):
        build_projector("mlp0x_gelu", 8, 16)


def test_unknown_activation_rejected():
    with pytest.raises(ConfigError, match="projector_hidden_act"):
        build_projector("mlp2x_gelu", 8, 16, hidden_act="swishy")


@pytest.mark.parametrize("kind", ["ldp", "ldpv2"])
def test_non_square_token_grid_rejected(kind):
    # 577 = 24*24 patches plus a CLS token that should have been dropped
    proj = build_projector(kind, 8, 16)
    with pytest.raises(ConfigError, match="square grid"):
        proj(torch.randn(1, 577, 8))


def test_ldp_text_hidden_must_be_multiple_of_8():
    with pytest.raises(ConfigError, match="divisible by 8"):
        build_projector("ldp", 8, 20)


@pytest.mark.parametrize("kind", ["ldp", "ldpv2", "mlp2x_gelu"])
def test_dtype_and_meta_device(kind):
    proj = build_projector(kind, 16, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        out = proj(torch.randn(1, 36, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    # Built on the meta device (the loader's first step), the parameters have the real shapes.
    meta = build_projector(kind, 16, 24, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in proj.state_dict().items()}
