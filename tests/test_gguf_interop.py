"""llama.cpp interop for VLMs: GGUF export (language model + mmproj), loading a GGUF pair, and the same greedy
answers from llama.cpp's own ``llama-mtmd-cli`` (built from the llama-cpp-python sdist by
benchmarks/build_llamacpp.sh, cached outside the repository)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pocketvlm
from pocketvlm.errors import ConfigError, CorruptWeightsError, UnsupportedArchitectureError
from pocketvlm.export import export_gguf
from pocketvlm.export.llamacpp import binary, mtmd_answer
from serve_fixtures import make_tiny_llava, make_tiny_qwen2

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    llava = make_tiny_llava(d / "llava")
    out = export_gguf(llava, d / "f16", type="f16", name="tiny", progress=False)
    return {"dir": d, "llava": llava, **out}


@pytest.fixture(scope="module")
def mtmd_cli(llamacpp_tool):
    return llamacpp_tool("llama-mtmd-cli")


def _image(path: Path, size: tuple[int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    img = np.stack([(xx * 255 // max(size[0] - 1, 1)), (yy * 255 // max(size[1] - 1, 1)),
                    rng.integers(0, 256, (size[1], size[0]))], -1).astype(np.uint8)
    Image.fromarray(img).save(path)
    return path


def _ask(model, image: Path, question: str = QUESTION, max_tokens: int = 12) -> str:
    """The greedy answer as its tokens decode, as llama.cpp prints them (``chat`` drops a character that
    ``max_tokens`` cut in half; random models often end on one)."""
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": question}]}]
    done = model.complete_chat(msgs, max_tokens=max_tokens, temperature=0)
    return model.tokenizer.decode([t for t in done.tokens if t not in model.chat_stop_ids])


# --- export ---------------------------------------------------------------------------------------------

def test_export_writes_llama_cpp_names_and_keys(tiny):
    from pocketvlm.loading.gguf_file import read_gguf

    text, mm = read_gguf(tiny["model"]), read_gguf(tiny["mmproj"])
    assert text.metadata["general.architecture"] == "qwen2"
    assert text.metadata["tokenizer.ggml.model"] == "gpt2" and text.metadata["tokenizer.ggml.pre"] == "gpt-2"
    assert "<image>" in list(text.metadata["tokenizer.ggml.tokens"])
    assert text.metadata["tokenizer.chat_template"]
    names = {t.name for t in text.tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.attn_q.bias", "blk.1.ffn_down.weight"} <= names
    assert mm.metadata["general.architecture"] == "clip" and mm.metadata["clip.projector_type"] == "mlp"
    # LLaVA's -2 of a 2-layer CLIP: hidden state 1, so one layer stored; no post_layernorm
    assert list(mm.metadata["clip.vision.feature_layer"]) == [1] and mm.metadata["clip.vision.block_count"] == 1
    mnames = {t.name for t in mm.tensors}
    assert {"v.class_embd", "v.pre_ln.weight", "v.blk.0.attn_out.weight", "mm.0.weight", "mm.2.bias"} <= mnames
    assert not any(n.startswith("v.blk.1.") or n.startswith("v.post_ln") for n in mnames)
    types = {t.name: t.tensor_type.name for t in text.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"


def test_text_roundtrip_logits(tmp_path):
    """A text model exported and loaded back gives the original logits (f16: float16 tolerance; q8_0 looser)."""
    src = make_tiny_qwen2(tmp_path / "qwen")
    ref = pocketvlm.load(src)
    ids = ref.tokenizer.encode("Hello! How are you today? The sky is blue.")
    want = ref.logits(torch.tensor([ids]))
    for kind, tol in (("f16", 2e-2), ("q8_0", 0.15)):
        out = export_gguf(src, tmp_path / kind, type=kind, progress=False)
        got = pocketvlm.load(out["model"], quantization="q0f32").logits(torch.tensor([ids]))
        err = (got - want).abs().max().item() / want.abs().max().item()
        assert err < tol, (kind, err)
    assert out["mmproj"] is None


def test_llava_roundtrip_logits_and_answers(tiny):
    """export -> load(model.gguf, mmproj=...) equals the original LLaVA (f16 tolerance), image included."""
    ref = pocketvlm.load(tiny["llava"], quantization="q0f32", vision_precision="fp32")
    got = pocketvlm.load(tiny["model"], mmproj=tiny["mmproj"], quantization="q0f32", vision_precision="fp32")
    assert got.is_vlm and got.info()["architecture"] == "llava" and got.info()["mmproj"] == str(tiny["mmproj"])
    img = _image(tiny["dir"] / "rt.png", (32, 32), 0)
    _assert_same_logits(ref, got, img)
    assert _ask(ref, img) == _ask(got, img)


def _assert_same_logits(ref, got, img: Path, tol: float = 2e-2) -> None:
    """The same prompt ids and, image included, the same logits at every position within ``tol`` (relative to the
    largest logit; f16 weights on one side), with the same next token."""
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(img)}, {"type": "text", "text": QUESTION}]}]
    pr, pg = ref.chat_prompt(msgs), got.chat_prompt(msgs)
    assert pr.ids == pg.ids
    la, lb = _prompt_logits(ref, pr), _prompt_logits(got, pg)
    assert (la - lb).abs().max().item() / la.abs().max().item() < tol
    assert la[-1].argmax() == lb[-1].argmax()


def _prompt_logits(pm, prompt):
    """Logits of every position of an image prompt (the image features spliced in as the engine does)."""
    with torch.no_grad():
        return pm.model(inputs_embeds=prompt.embed_fn(0, len(prompt.ids)))[0]


# --- llama.cpp itself ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size,seed", [((32, 32), 1), ((32, 32), 2), ((32, 32), 3), ((48, 48), 5), ((96, 96), 6)])
def test_llama_cpp_answers_as_pocketvlm(tiny, mtmd_cli, size, seed):
    """llama-mtmd-cli on the exported pair gives pocketvlm's greedy answer on it, token for token (square images of
    several sizes: both engines resize them; a non-square one is padded by llama.cpp but centre-cropped by
    this model's CLIP preprocessing, so there the pixels differ by design)."""
    model = _tiny_gguf(tiny)
    img = _image(tiny["dir"] / f"cmp{seed}.png", size, seed)
    ours = _ask(model, img)
    theirs, _ = mtmd_answer(tiny["model"], tiny["mmproj"], img, QUESTION, n_predict=12, exe=mtmd_cli)
    assert theirs.strip() == _printed(ours)
    assert len(ours.strip()) > 5  # a real answer, not an early stop on both sides


def _printed(text: str) -> str:
    """An answer as llama-mtmd-cli prints it: each token piece goes through printf("%s"), which stops at a NUL
    byte (random models do write the byte-0 token)."""
    return text.replace("\x00", "").strip()


_REF = {}


def _tiny_gguf(tiny):
    """pocketvlm on the exported pair (dequantized, vision fp32): the same weights llama.cpp runs."""
    if "m" not in _REF:
        _REF["m"] = pocketvlm.load(tiny["model"], mmproj=tiny["mmproj"], quantization="q0f32",
                                   vision_precision="fp32")
    return _REF["m"]


# --- bad input -------------------------------------------------------------------------------------------

def test_mmproj_width_must_match_the_language_model(tiny, tmp_path):
    other = export_gguf(make_tiny_qwen2(tmp_path / "q48", hidden=48), tmp_path / "o", type="f16", progress=False)
    with pytest.raises(ConfigError, match="hidden size 48"):
        pocketvlm.load(other["model"], mmproj=tiny["mmproj"])


def test_files_swapped_or_wrong_kind(tiny):
    with pytest.raises(ConfigError, match="not an mmproj file"):
        pocketvlm.load(tiny["model"], mmproj=tiny["model"])
    with pytest.raises(ConfigError, match="is an mmproj file"):
        pocketvlm.load(tiny["mmproj"], mmproj=tiny["mmproj"])
    with pytest.raises(ConfigError, match="goes with a .gguf"):
        pocketvlm.load(tiny["llava"], mmproj=tiny["mmproj"])


def test_truncated_mmproj(tiny, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = Path(tiny["mmproj"]).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptWeightsError):
        pocketvlm.load(tiny["model"], mmproj=cut)


@pytest.mark.parametrize("kind,what", [("resampler", "MiniCPM-V resampler"), ("my_projector", "")])
def test_unknown_projector_type_is_named(tiny, tmp_path, kind, what):
    import gguf

    path = tmp_path / f"{kind}.gguf"
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", kind)
    w.add_tensor("mm.0.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match=f"'{kind}'.*{what}.*supported: mlp, ldp, ldpv2"):
        pocketvlm.load(tiny["model"], mmproj=path)


def test_export_refuses_what_llama_cpp_cannot_run(tmp_path):
    from types import SimpleNamespace

    from pocketvlm.export.gguf_text import arch_of

    # every text family has a writer now (tests/test_gguf_export_text.py); anything else is named
    with pytest.raises(UnsupportedArchitectureError, match="'dinov2' has no GGUF writer"):
        arch_of(SimpleNamespace(model_type="dinov2"))
    with pytest.raises(Exception, match="unknown GGUF export type"):
        export_gguf("whatever", tmp_path, type="q2_k")


def test_export_cli(tiny, tmp_path, capsys):
    from pocketvlm.cli import main

    assert main(["export", "gguf", str(tiny["llava"]), "-o", str(tmp_path), "--type", "q8_0", "--name", "t"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "t.gguf").exists() and (tmp_path / "mmproj-t.gguf").exists()
    assert "llama-mtmd-cli -m" in out
    m = pocketvlm.load(tmp_path / "t.gguf", mmproj=tmp_path / "mmproj-t.gguf")
    assert m.is_vlm and m.info()["quantization"] == "gguf"


def _make_vlm(d: Path, vision: dict, layers, strategy: str, size: int, seed: int) -> Path:
    """A tiny LLaVA saved by transformers (random weights, random layer scale for DINOv2), with a Qwen2 decoder,
    the tiny tokenizer plus ``<image>``, and a plain resize to ``size`` x ``size`` with ImageNet's mean/std."""
    import json

    import transformers
    from serve_fixtures import write_tokenizer
    from tokenizers import Tokenizer

    d.mkdir(parents=True, exist_ok=True)
    write_tokenizer(d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_special_tokens(["<image>"])
    tok.save(str(d / "tokenizer.json"))
    image_id = tok.token_to_id("<image>")
    torch.manual_seed(seed)
    text = dict(model_type="qwen2", vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                eos_token_id=2)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                   vision_feature_layer=layers, vision_feature_select_strategy=strategy)
    cfg.text_config.initializer_range = 0.3
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lambda1" in name:
                p.copy_(torch.rand_like(p) * 1.5 + 0.25)
        hf.lm_head.weight[image_id] = 0
    hf.save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
        "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3}))
    return d


TOWERS = {
    # DINOv2 with random layer scale, two feature layers, input 42 != the tower's 28 (positions resampled)
    "dinov2": (dict(model_type="dinov2", image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=3,
                    num_attention_heads=4, mlp_ratio=2), [-2, -1], "default", 42),
    # SigLIP: no class token, every patch kept ("full")
    "siglip": (dict(model_type="siglip_vision_model", image_size=32, patch_size=8, hidden_size=32,
                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=2), -1, "full", 32),
}


@pytest.fixture(scope="module", params=sorted(TOWERS))
def tower_vlm(request, tmp_path_factory):
    vision, layers, strategy, size = TOWERS[request.param]
    d = _make_vlm(tmp_path_factory.mktemp(request.param), vision, layers, strategy, size, seed=1)
    out = export_gguf(d, d / "gguf", type="f16", name=request.param, progress=False)
    return {"kind": request.param, "dir": d, "folder": d, "size": size, **out}


def test_tower_export_roundtrip_and_llama_cpp(tower_vlm, mtmd_cli):
    """DINOv2 and SigLIP towers: export -> load gives the original logits (f16 tolerance), and llama.cpp answers
    as pocketvlm does on the same pair of files."""
    from pocketvlm.loading.gguf_file import read_gguf

    mm = read_gguf(tower_vlm["mmproj"])
    assert mm.metadata["clip.vision.image_size"] == tower_vlm["size"]
    if tower_vlm["kind"] == "dinov2":
        assert list(mm.metadata["clip.vision.feature_layer"]) == [2, 3]
        assert not any(".ls1" in t.name or ".ls2" in t.name for t in mm.tensors)  # folded
    ref = pocketvlm.load(tower_vlm["folder"], quantization="q0f32", vision_precision="fp32")
    got = pocketvlm.load(tower_vlm["model"], mmproj=tower_vlm["mmproj"], quantization="q0f32",
                         vision_precision="fp32")
    s = tower_vlm["size"]
    for seed, size in ((1, (s, s)), (2, (s, s)), (3, (2 * s, 2 * s))):
        img = _image(tower_vlm["dir"] / f"d{seed}.png", size, seed)
        _assert_same_logits(ref, got, img)
        # the same files in both engines (fp32 vs f16 weights can flip a near-tie of a random model)
        ours = _ask(got, img)
        theirs, _ = mtmd_answer(tower_vlm["model"], tower_vlm["mmproj"], img, QUESTION, n_predict=12, exe=mtmd_cli)
        assert theirs.strip() == _printed(ours) and len(ours.strip()) > 5


def test_export_refuses_a_selection_llama_cpp_cannot_run(tmp_path):
    vision, _, _, size = TOWERS["siglip"]
    d = _make_vlm(tmp_path / "m", vision, -1, "default", size, seed=0)  # drops SigLIP's first patch
    with pytest.raises(UnsupportedArchitectureError, match="SigLIP tower with vision_feature_select_strategy"):
        export_gguf(d, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()  # refused before anything was written


# --- the other direction: files made by llama.cpp's own converters ----------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory, mtmd_cli, qwen_gguf):
    """A tiny LLaVA-1.5 (CLIP + Qwen2, with the real Qwen2.5 vocabulary so that llama.cpp's converter recognises
    its pre-tokenizer), converted by llama.cpp's convert_hf_to_gguf.py (language model) and its legacy LLaVA
    converter tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py (CLIP tower + projector)."""
    import json
    import sys

    import transformers
    from pocketvlm.tokenizer import Tokenizer
    from serve_fixtures import CHATML

    src = mtmd_cli.parents[2] / "src"
    d = tmp_path_factory.mktemp("converted")
    hf_dir, text_dir, clip_dir = d / "llava", d / "text", d / "clip"
    qtok = Tokenizer.from_gguf(qwen_gguf)
    backend = qtok.backend
    backend.add_special_tokens(["<image>"])
    image_id = backend.token_to_id("<image>")
    files = {"tokenizer_config.json": json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
        "chat_template": CHATML, "tokenizer_class": "PreTrainedTokenizerFast"})}
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
    text = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=image_id + 1, max_position_embeddings=256,
                                    tie_word_embeddings=False, eos_token_id=qtok.eos_token_id, initializer_range=0.3)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                   vision_feature_layer=-2, vision_feature_select_strategy="default",
                                   tie_word_embeddings=False)
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        hf.lm_head.weight[image_id] = 0
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    for folder in (hf_dir, text_dir):
        folder.mkdir()
        backend.save(str(folder / "tokenizer.json"))
        for name, content in files.items():
            (folder / name).write_text(content)
    hf.save_pretrained(hf_dir)
    (hf_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32}, "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32}, "image_mean": mean, "image_std": std, "resample": 3}))
    lm = transformers.Qwen2ForCausalLM(text).eval()
    lm.model.load_state_dict(hf.model.language_model.state_dict())
    lm.lm_head.load_state_dict(hf.lm_head.state_dict())
    lm.save_pretrained(text_dir)
    hf.model.vision_tower.save_pretrained(clip_dir)
    # transformers 5 saves a CLIPVisionModel without the "vision_model." level that the converter's transformers 4
    # looks for (it would silently start from random weights): the checkpoint in transformers 4's layout
    from safetensors.torch import load_file, save_file

    st = clip_dir / "model.safetensors"
    save_file({(k if k.startswith("vision_model.") else "vision_model." + k): v for k, v in load_file(st).items()},
              str(st), metadata={"format": "pt"})
    proj = {f"model.mm_projector.{i}.{a}": getattr(getattr(hf.model.multi_modal_projector, lin), a).detach().clone()
            for i, lin in ((0, "linear_1"), (2, "linear_2")) for a in ("weight", "bias")}
    torch.save(proj, d / "llava.projector")
    out = d / "gguf"
    out.mkdir()
    # the legacy converter was written for transformers 4 (it reads CLIPVisionModel.vision_model): it runs with
    # transformers 4 installed beside it, in llama.cpp's cache folder, ahead of this environment's transformers 5
    legacy = mtmd_cli.parents[2] / "legacy-py"
    if not (legacy / "transformers").is_dir():
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(legacy),
                            "transformers>=4.45,<5"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    for cmd, path in (([str(src / "convert_hf_to_gguf.py"), str(text_dir), "--outfile", str(out / "text.gguf"),
                        "--outtype", "f16"], [src / "gguf-py"]),
                      ([str(src / "tools" / "mtmd" / "legacy-models" / "convert_image_encoder_to_gguf.py"),
                        "-m", str(clip_dir), "--clip-model-is-vision", "--llava-projector", str(d / "llava.projector"),
                        "--output-dir", str(out), "--image-mean", *map(str, mean), "--image-std", *map(str, std)],
                       [legacy, src / "gguf-py"])):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, path))}
        r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
    return {"dir": d, "folder": hf_dir, "model": out / "text.gguf", "mmproj": out / "mmproj-model-f16.gguf"}


def test_llama_cpp_converted_pair_answers_as_the_hf_folder(converted, mtmd_cli):
    from pocketvlm.loading.gguf_file import read_gguf

    mm = read_gguf(converted["mmproj"]).metadata
    assert mm["clip.has_llava_projector"] and "clip.vision.feature_layer" not in mm  # the legacy layout
    assert mm["clip.vision.block_count"] == 1  # LLaVA's -2: the converter dropped the last layer
    ref = pocketvlm.load(converted["folder"], quantization="q0f32", vision_precision="fp32")
    got = pocketvlm.load(converted["model"], mmproj=converted["mmproj"], quantization="q0f32",
                         vision_precision="fp32")
    assert got.info()["quantization"] == "q0f32"
    for seed in (1, 2, 3):
        img = _image(converted["dir"] / f"c{seed}.png", (32, 32), seed)
        _assert_same_logits(ref, got, img)


# --- MobileVLM: LDP and LDPv2 projectors over CLIP and a Llama decoder -----------------------------------

@pytest.fixture(scope="module", params=["ldpnet", "ldpnetv2"])
def mobile(request, tmp_path_factory):
    """A tiny MobileVLM folder (original checkpoint layout) whose CLIP gives llama.cpp's fixed 24x24 patch grid
    (96 px, patch 4), with a Llama decoder and the tiny tokenizer; exported at f16."""
    import json

    import transformers
    from safetensors.torch import save_file
    from serve_fixtures import CHATML, write_tokenizer

    from pocketvlm.models.projectors import build_projector

    root = tmp_path_factory.mktemp(f"mobile_{request.param}")
    d = root / "mobilevlm"
    d.mkdir()
    vocab = write_tokenizer(d)
    conf = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**conf, "chat_template": CHATML}))
    torch.manual_seed(2)
    vcfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=96,
                patch_size=4)
    tower = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vcfg)).eval()
    tower.save_pretrained(root / "clip")
    text = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab, max_position_embeddings=512, eos_token_id=2, bos_token_id=None, initializer_range=0.3,
        tie_word_embeddings=False)).eval()
    proj = build_projector(request.param, 32, 64).eval()
    with torch.no_grad():
        for p in proj.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    weights = dict(text.state_dict())
    weights |= {"model.vision_tower.vision_tower." + (k if k.startswith("vision_model.") else "vision_model." + k): v
                for k, v in tower.state_dict().items()}
    weights |= {"model.mm_projector." + k: v for k, v in proj.state_dict().items()}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(d / "model.safetensors"))
    cfg = {**text.config.to_dict(), "model_type": "mobilevlm", "architectures": ["MobileLlamaForCausalLM"],
           "mm_vision_tower": str(root / "clip"), "mm_projector_type": request.param, "mm_hidden_size": 32,
           "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad"}
    (d / "config.json").write_text(json.dumps(cfg))
    out = export_gguf(d, root / "gguf", type="f16", name="mobile", progress=False)
    return {"kind": request.param, "dir": root, "folder": d, **out}


def test_mobilevlm_export_load_and_llama_cpp(mobile, mtmd_cli):
    from pocketvlm.loading.gguf_file import read_gguf

    mm = read_gguf(mobile["mmproj"]).metadata
    assert mm["clip.projector_type"] == {"ldpnet": "ldp", "ldpnetv2": "ldpv2"}[mobile["kind"]]
    ref = pocketvlm.load(mobile["folder"], quantization="q0f32", vision_precision="fp32")
    got = pocketvlm.load(mobile["model"], mmproj=mobile["mmproj"], quantization="q0f32", vision_precision="fp32")
    assert got.info()["architecture"] == "mobilevlm"
    for seed in (1, 2):
        img = _image(mobile["dir"] / f"m{seed}.png", (96, 96), seed)
        _assert_same_logits(ref, got, img)
        ours = _ask(got, img)
        theirs, _ = mtmd_answer(mobile["model"], mobile["mmproj"], img, QUESTION, n_predict=12, exe=mtmd_cli)
        assert theirs.strip() == _printed(ours) and len(ours.strip()) > 5


def test_export_q4_k_m_through_llama_quantize(tiny, mtmd_cli, tmp_path):
    """--type q4_k_m: the f16 file requantized by llama.cpp's own llama-quantize (small rows fall back to the
    types it picks for them), loadable as a VLM pair on its own blocks."""
    from pocketvlm.loading.gguf_file import read_gguf

    assert binary("llama-quantize") is not None
    out = export_gguf(tiny["llava"], tmp_path, type="q4_k_m", name="k", progress=False)
    g = read_gguf(out["model"])
    assert g.metadata["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert {t.tensor_type.name for t in g.tensors} - {"F32", "F16"}  # quantized blocks
    m = pocketvlm.load(out["model"], mmproj=out["mmproj"])
    assert m.info()["quantization"] == "gguf" and len(_ask(m, _image(tmp_path / "k.png", (32, 32), 0)).strip()) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.gguf", "k.png", "mmproj-k.gguf"]  # no temporary left


def test_convert_a_llava_gguf_pair_to_a_package(tiny, tmp_path):
    _convert_pair(tiny, tmp_path)


def test_convert_a_mobilevlm_gguf_pair_to_a_package(mobile, tmp_path):
    _convert_pair(mobile, tmp_path)


def _convert_pair(pair, tmp_path):
    """`pocketvlm convert model.gguf --mmproj ...`: a package of the joined VLM (HF-style config, its
    preprocessing), which loads and answers as the pair quantized on load (same RTN scales)."""
    from pocketvlm.cli import main

    out = tmp_path / "pkg"
    # float tensors kept in float32 (the mode's default stores them in float16, which moves the f32 biases)
    assert main(["convert", str(pair["model"]), "--mmproj", str(pair["mmproj"]), "-q", "q4f16_1", "--scales", "rtn",
                 "--dtype", "float32", "-o", str(out)]) == 0
    assert (out / "preprocessor_config.json").exists()
    pkg = pocketvlm.load(out, vision_precision="fp32")
    direct = pocketvlm.load(pair["model"], mmproj=pair["mmproj"], quantization="q4f16_1", vision_precision="fp32")
    assert pkg.is_vlm and pkg.architecture == direct.architecture
    side = pkg.image_processor.crop_size[0] if pkg.image_processor.crop_size else pkg.image_processor.size[0]
    img = _image(tmp_path / "p.png", (side, side), 4)
    assert _ask(pkg, img) == _ask(direct, img)
