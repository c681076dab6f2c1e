"""convert / load_package / package bundles / fit, on tiny random Hugging Face models (transformers, test-only)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pocketvlm
from pocketvlm import loading
from pocketvlm.errors import DeviceError, PackageError, QuantizationError
from pocketvlm.package import convert, load_package
from pocketvlm.package.devices import DEVICES, get_device
from pocketvlm.package.memory import estimate_memory, params_estimate

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tiny(folder: Path, hidden=80, seed=0) -> Path:
    """Tiny Qwen2 (hidden 80: the 32-group of q4/q8 and the 40-group of q3 do not divide the 96-wide MLP
    input or the 80-wide attention input, so padding is exercised) with a byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=300, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=257)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHAT}))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "qwen")


@pytest.fixture(scope="module")
def pkg(tiny, tmp_path_factory) -> Path:
    return convert(tiny, "q4f16_1", tmp_path_factory.mktemp("pkg") / "q4", progress=False)


def reference(tiny, mode, search=True):
    """The in-memory quantized model, its 4-bit layers in the kernel layout a package stores (prefill's dense
    path dequantizes that layout in C++, the plain one in PyTorch: equal to rounding, not bit for bit)."""
    from pocketvlm.quant import QuantLinear, quantize_model

    ref = loading.load(tiny)
    quantize_model(ref.model, mode, embeddings=True, search=search)
    for m in ref.model.modules():
        if isinstance(m, QuantLinear) and m.stored_kernel_shape() is not None:
            m._prepare_own()
    return ref.model


# --- convert and load -------------------------------------------------------------------------------

def test_package_layout_and_manifest(pkg, tiny):
    m = json.loads((pkg / "manifest.json").read_text())
    names = {p.name for p in pkg.iterdir()} - {"manifest.json"}
    assert set(m["files"]) == names
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    import hashlib

    for n, e in m["files"].items():
        data = (pkg / n).read_bytes()
        assert e["bytes"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
    assert m["bytes_on_disk"] == sum(e["bytes"] for e in m["files"].values())
    assert m["quantization"] == "q4f16_1" and m["pocketvlm_version"]
    ref = loading.load(tiny).model
    total = sum(p.numel() for p in ref.parameters())  # tied head counted once
    assert m["parameters"]["total"] == total and m["parameters"]["vision"] == 0
    linear = sum(mod.weight.numel() for mod in ref.modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding))
                 if mod is not ref.lm_head)
    assert m["parameters"]["quantized"] == linear
    q = json.loads((pkg / "config.json").read_text())["quantization"]
    assert (q["mode"], q["bits"], q["group_size"]) == ("q4f16_1", 4, 32)
    assert q["modules"]["lm_head"] == "tied:model.embed_tokens"
    assert q["modules"]["model.layers.0.mlp.down_proj"] == "q4f16_1"
    assert set(m["memory"]["bytes"]) >= {"weights", "kv_cache", "activations", "vision", "runtime", "total"}


@pytest.mark.parametrize("mode", ["q4f16_1", "q3f16_1", "q8f16_1", "q4f32_1"])
def test_loaded_package_matches_in_memory_quantization(tiny, tmp_path, mode):
    out = convert(tiny, mode, tmp_path / mode, progress=False)
    got = load_package(out, verify=True)
    from pocketvlm.quant import QuantLinear

    padded = [n for n, m in got.model.named_modules() if isinstance(m, QuantLinear) and m.in_features % m.group_size]
    assert padded  # a layer whose input the group size does not divide: zero-padded, and it still runs
    ids = torch.arange(0, 300, 7)[None]
    with torch.inference_mode():
        a, b = got.model(ids), reference(tiny, mode)(ids)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the saved codes are the in-memory ones
    with torch.inference_mode():
        f = loading.load(tiny).model(ids)
    assert (a - f).abs().max() < 0.5 * f.abs().max()  # and still the same model, approximately


def test_rtn_scales_are_mlc_formula(tiny, tmp_path):
    out = convert(tiny, "q4f16_1", tmp_path / "rtn", progress=False, scales="rtn")
    got = load_package(out)
    assert json.loads((out / "config.json").read_text())["quantization"]["scales"] == "rtn"
    ids = torch.arange(0, 300, 7)[None]
    with torch.inference_mode():
        torch.testing.assert_close(got.model(ids), reference(tiny, "q4f16_1", search=False)(ids), rtol=0, atol=0)
    with pytest.raises(PackageError, match="scales must be"):
        convert(tiny, "q4f16_1", tmp_path / "bad", progress=False, scales="minmax")


def test_q0_mode_stores_float16_and_loads_in_requested_dtype(tiny, tmp_path):
    out = convert(tiny, "q0f16", tmp_path / "f16", progress=False)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert "lm_head.weight" not in set(f.keys())  # tied: stored once
    got = load_package(out, dtype="bfloat16")
    assert got.model.lm_head.weight.data_ptr() == got.model.model.embed_tokens.weight.data_ptr()
    ids = torch.arange(20)[None]
    with torch.inference_mode():
        a = got.model(ids).float()
        f = loading.load(tiny).model(ids)
    torch.testing.assert_close(a, f, atol=0.05, rtol=0.05)


def test_package_chats_through_the_api(pkg):
    pm = pocketvlm.load(pkg, context_window_size=128)
    assert pm.loaded.kind == "package" and pm.tokenizer.chat_template == CHAT
    out = pm.chat("hello", max_tokens=5, temperature=0)
    assert isinstance(out, str)
    assert pm.info()["parameters"] > 0


def test_sharded_package(tiny, tmp_path):
    out = convert(tiny, "q8f16_1", tmp_path / "sh", progress=False, shard_bytes=8000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").exists()
    ids = torch.arange(30)[None]
    with torch.inference_mode():
        torch.testing.assert_close(load_package(out, verify=True).model(ids), reference(tiny, "q8f16_1")(ids),
                                   rtol=0, atol=0)


def test_cli_convert(tiny, tmp_path, capsys):
    from pocketvlm.cli import main

    assert main(["convert", str(tiny), "--quantization", "q4f16_1", "-o", str(tmp_path / "c")]) == 0
    assert "q4f16_1" in capsys.readouterr().out
    assert (tmp_path / "c" / "manifest.json").exists()


# --- bad input ----------------------------------------------------------------------------------------

def test_unknown_mode_lists_valid_ones(tiny, tmp_path, capsys):
    with pytest.raises(QuantizationError, match="q4f16_1.*q3f16_1"):
        convert(tiny, "q5f16_9", tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    from pocketvlm.cli import main

    assert main(["convert", str(tiny), "-q", "int4", "-o", str(tmp_path / "y")]) == 2
    assert "valid modes" in capsys.readouterr().err


def test_nonempty_output_needs_overwrite(tiny, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PackageError, match="not empty.*--overwrite"):
        convert(tiny, "q4f16_1", out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    convert(tiny, "q4f16_1", out, overwrite=True, progress=False)
    assert not (out / "notes.txt").exists() and (out / "manifest.json").exists()


def test_converting_a_package_is_refused(pkg, tmp_path):
    with pytest.raises(PackageError, match="already a pocketvlm package"):
        convert(pkg, "q4f16_1", tmp_path / "again", progress=False)


@pytest.fixture
def pkg_copy(pkg, tmp_path):
    import shutil

    return Path(shutil.copytree(pkg, tmp_path / "copy"))


def test_tampered_file_fails_verification(pkg_copy):
    f = pkg_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF  # same size, different weights
    f.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="model.safetensors.*sha256"):
        load_package(pkg_copy, verify=True)
    load_package(pkg_copy)  # the size check alone cannot see it: that is what verify is for


def test_tampered_config_fails_verification(pkg_copy):
    cfg = pkg_copy / "config.json"
    text = cfg.read_text()
    cfg.write_text(text.replace('"q4f16_1"', '"q4f32_1"', 1))  # same size
    assert cfg.stat().st_size == len(text.encode())
    with pytest.raises(PackageError, match="config.json does not match its sha256"):
        load_package(pkg_copy, verify=True)


def test_truncated_file_is_a_package_error(pkg_copy):
    f = pkg_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(PackageError, match="model.safetensors has .* bytes.*truncated"):
        load_package(pkg_copy)
    # even with the manifest edited to match, the reader sees the missing tensor bytes
    m = json.loads((pkg_copy / "manifest.json").read_text())
    m["files"]["model.safetensors"]["bytes"] = f.stat().st_size
    (pkg_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match="truncated"):
        load_package(pkg_copy)


def test_missing_file_and_missing_manifest(pkg_copy):
    (pkg_copy / "tokenizer.json").unlink()
    with pytest.raises(PackageError, match="tokenizer.json is missing"):
        load_package(pkg_copy)
    (pkg_copy / "manifest.json").unlink()
    with pytest.raises(PackageError, match="no manifest.json"):
        load_package(pkg_copy)


# --- package bundles ------------------------------------------------------------------------------------

def test_package_bundle(tiny, tmp_path, capsys):
    from pocketvlm.cli import main

    other = make_tiny(tmp_path / "other", hidden=64, seed=1)
    cfg = {"device": "iphone", "model_list": [
        {"model": str(tiny), "model_id": "tiny-q4", "quantization": "q4f16_1",
         "overrides": {"context_window_size": 128, "prefill_chunk_size": 64}},
        {"model": str(other), "model_id": "other-q8", "quantization": "q8f16_1", "estimated_vram_bytes": 123456789}]}
    cf = tmp_path / "mlc-package-config.json"
    cf.write_text(json.dumps(cfg))
    assert main(["package", str(cf), "-o", str(tmp_path / "bundle")]) == 0
    out = capsys.readouterr().out
    assert "tiny-q4" in out and "other-q8" in out and "total estimated" in out
    m = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    by = {e["model_id"]: e for e in m["model_list"]}
    assert by["other-q8"]["estimated_vram_bytes"] == 123456789 and by["other-q8"]["estimated_by"] == "config"
    est = json.loads((tmp_path / "bundle" / "tiny-q4" / "manifest.json").read_text())["memory"]
    assert by["tiny-q4"]["estimated_vram_bytes"] == est["bytes"]["total"] and est["context_window_size"] == 128
    assert m["total_estimated_bytes"] == 123456789 + est["bytes"]["total"]
    assert m["fit"]["device"] == "iphone-13"
    load_package(tmp_path / "bundle" / "other-q8", verify=True)


@pytest.mark.parametrize("bad, match", [
    ({"model_list": []}, "missing the field 'device'"),
    ({"device": "iphone"}, "missing the field 'model_list'"),
    ({"device": "iphone", "model_list": [{"model": "m", "quantization": "q4f16_1"}]},
     r"model_list\[0\] is missing the field 'model_id'"),
    ({"device": "iphone", "model_list": [{"model": "m", "model_id": "a", "quantization": "q4f16_1"},
                                         {"model": "m", "model_id": "b"}]},
     r"model_list\[1\] \(b\) is missing the field 'quantization'"),
    ({"device": "iphone", "model_list": [{"model_id": "a", "quantization": "q4f16_1"}]},
     r"model_list\[0\] \(a\) is missing the field 'model'"),
    ({"device": "iphone", "model_list": [{"model": "m", "model_id": "a", "quantization": "q4f16_1",
                                          "overrides": {"context_window": 5}}]}, "unknown override"),
])
def test_package_config_errors(bad, match, tmp_path):
    from pocketvlm.package import package

    with pytest.raises(PackageError, match=match):
        package(bad, tmp_path / "b")
    assert not (tmp_path / "b").exists()


# --- fit --------------------------------------------------------------------------------------------------

GEMMA_2B = {"model_type": "gemma", "vocab_size": 256000, "hidden_size": 2048, "intermediate_size": 16384,
            "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256,
            "max_position_embeddings": 8192, "tie_word_embeddings": True}


def test_gemma_2b_class_does_not_fit_a_4gb_ipad():
    est = estimate_memory(GEMMA_2B, "q4f16_1", 2048, tokenizer_bytes=17_000_000)
    assert 1.8e9 < est["total"] < 3.5e9
    ipad = get_device("iPad Pro 11\" 1st gen")
    assert ipad.ram_gb == 4 and est["total"] > ipad.usable_bytes  # fits 4 GB of RAM, not the app's share
    assert est["total"] < 4 * 1024 ** 3
    assert est["total"] < get_device("iphone-16").usable_bytes


def test_device_table_and_numbers():
    for name in ("iphone-x", "iphone-13", "ipad-pro-11-gen1", "iphone-16", "ipad-air-6", "galaxy-s24-ultra",
                 "snapdragon-888-phone", "jetson-orin-nano", "laptop-16gb"):
        d = DEVICES[name]
        assert 0 < d.share < 1 and d.usable_bytes < d.ram_gb * 1024 ** 3
    assert get_device("iPhone 13").name == "iphone-13" and get_device("android").platform == "android"
    assert get_device("3.5").usable_bytes == int(3.5 * 1024 ** 3) and get_device(2).usable_bytes == 2 * 1024 ** 3
    with pytest.raises(DeviceError, match="unknown device 'nokia-3310'.*iphone-13.*laptop-16gb"):
        get_device("nokia-3310")
    with pytest.raises(DeviceError, match="positive"):
        get_device("-1")


def test_fit_cli(pkg, tiny, tmp_path, capsys):
    from pocketvlm.cli import main

    cfg = tmp_path / "gemma"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps(GEMMA_2B))
    assert main(["fit", str(cfg), "--device", "ipad-pro-11-gen1", "--context-window-size", "2048"]) == 1
    out = capsys.readouterr().out
    assert "iPad Pro" in out and "NO" in out
    assert main(["fit", str(pkg), str(tiny), "--device", "iphone-x"]) == 0
    out = capsys.readouterr().out
    assert "all models together" in out and "yes" in out
    assert main(["fit", "--params", "2.5e9", "--params", "1e9", "--device", "3", "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    one, two = params_estimate(2.5e9, "q4f16_1")["total"], params_estimate(1e9, "q4f16_1")["total"]
    assert j["total_bytes"] == one + two  # the two-model assistant: summed
    assert main(["fit", "--params", "7e9", "--all-devices"]) == 0
    out = capsys.readouterr().out
    assert all(d.label in out for d in DEVICES.values())
    assert main(["fit", str(pkg), "--device", "nokia"]) == 2
    assert "unknown device" in capsys.readouterr().err


def run(model, ids):
    with torch.inference_mode():
        return model(ids[:, :1]), model(ids)


def test_4bit_weights_are_stored_in_the_kernel_layout_and_load_without_repacking(tiny, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from pocketvlm.quant import QuantLinear, cpu_kernel
    from pocketvlm.quant.linear import KERNEL_LAYOUT

    out = convert(tiny, "q4f16_1", tmp_path / "own", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["kernel_layout"] == KERNEL_LAYOUT
    stored = load_file(str(out / "model.safetensors"))
    own = {k for k in stored if k.endswith(".qweight")}  # every layer of a symmetric 4-bit mode
    assert stored["model.layers.0.mlp.down_proj.qweight"].dim() == 3  # N = 80: rows8
    assert stored["model.embed_tokens.table.qweight"].dim() == 2  # N = 300 is not a multiple of 8: rows
    ids = torch.arange(0, 300, 7)[None]

    def no_packing(codes, *a, **k):
        raise AssertionError(f"a stored kernel layout was repacked ({tuple(codes.shape)})")

    with monkeypatch.context() as m:
        m.setattr(cpu_kernel, "pack_q4", no_packing)
        got = load_package(out)
        layers = {n: q for n, q in got.model.named_modules() if isinstance(q, QuantLinear)}
        assert {q._layout for q in layers.values()} == {"own"}
        calls = run(got.model, ids)  # one token (the kernel itself), then a prefill (the dense path)
    ref = reference(tiny, "q4f16_1")
    for x, y in zip(calls, run(ref, ids)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # a package written before the kernel layout (plain codes, no kernel_layout key) still loads the same
    plain = {n: q for n, q in ref.named_modules() if isinstance(q, QuantLinear)}
    for k in own:
        stored[k] = plain[k.removesuffix(".qweight")].state_dict()["qweight"]  # state_dict(): plain codes
        assert stored[k].dim() == 2
    save_file(stored, str(out / "model.safetensors"))
    del config["quantization"]["kernel_layout"]
    from pocketvlm.package.convert import write_manifest

    def rewrite():
        (out / "config.json").write_text(json.dumps(config))
        write_manifest(out, [p.name for p in out.iterdir() if p.name != "manifest.json"], source=str(tiny),
                       mode="q4f16_1", total=1, vision=0, quantized=1, context_window_size=None,
                       prefill_chunk_size=512)

    rewrite()
    old = load_package(out, verify=True)
    assert {q._layout for q in old.model.modules() if isinstance(q, QuantLinear)} == {"plain"}
    for x, y in zip(calls, run(old.model, ids)):  # repacked at its first call
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    config["quantization"]["kernel_layout"] = "q4-rows16-v9"  # a layout from a newer pocketvlm
    rewrite()
    with pytest.raises(PackageError, match="q4-rows16-v9"):
        load_package(out)
