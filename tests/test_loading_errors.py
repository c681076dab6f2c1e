"""Bad model inputs give specific exceptions (API) and a one-line error with a non-zero exit (CLI)."""
import json
import shutil

import pytest
import torch

from pocketvlm import loading
from pocketvlm.cli import main
from pocketvlm.errors import (ConfigError, CorruptWeightsError, ModelNotFoundError, TemplateError,
                              UnsupportedArchitectureError)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   vocab_size=64)
    d = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def test_missing_path():
    with pytest.raises(ModelNotFoundError, match="not found"):
        loading.load("/no/such/model/here")


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        loading.load(tmp_path)


def test_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedArchitectureError, match="supported: .*llama.*qwen2"):
        loading.load(tmp_path)


def test_missing_required_config_key(tmp_path, tiny_folder):
    d = tmp_path / "m"
    shutil.copytree(tiny_folder, d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="hidden_size"):
        loading.load(d)


def test_truncated_safetensors(tmp_path, tiny_folder):
    d = tmp_path / "m"
    shutil.copytree(tiny_folder, d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CorruptWeightsError, match="truncated or corrupt"):
        loading.load(d)


def test_corrupt_safetensors_header(tmp_path, tiny_folder):
    d = tmp_path / "m"
    shutil.copytree(tiny_folder, d)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptWeightsError):
        loading.load(d)


def test_weights_that_do_not_match_config(tmp_path, tiny_folder):
    d = tmp_path / "m"
    shutil.copytree(tiny_folder, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptWeightsError, match="missing"):
        loading.load(d)


def test_truncated_gguf(tmp_path, qwen_gguf):
    f = tmp_path / "cut.gguf"
    with open(qwen_gguf, "rb") as src:
        f.write_bytes(src.read(3_000_000))
    with pytest.raises(CorruptWeightsError):
        loading.load(f)


def test_empty_gguf_is_a_clear_error_for_the_model_and_the_tokenizer(tmp_path):
    from pocketvlm.tokenizer import Tokenizer

    f = tmp_path / "empty.gguf"
    f.write_bytes(b"")
    with pytest.raises(CorruptWeightsError, match="is empty, not a GGUF file"):
        loading.load_gguf(f)
    with pytest.raises(CorruptWeightsError, match="is empty, not a GGUF file"):
        Tokenizer.from_gguf(f)


def test_gguf_architecture_not_supported(tmp_path):
    import gguf

    f = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(f), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match="GGUF architecture 'bert'"):
        loading.load(f)


def test_hub_id_offline_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="unreachable|cannot download"):
        loading.load("someone/some-model-that-is-not-cached")


def test_unknown_template_name():
    from pocketvlm.chat import get_template

    with pytest.raises(TemplateError, match="chatml"):
        get_template("no-such-template")


@pytest.mark.parametrize("argv, needle", [
    (["info", "/no/such/model"], "not found"),
    (["generate", "/no/such/model", "-p", "hi"], "not found"),
    (["generate", "/no/such/model", "-p", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "/no/such/model", "-p", "hi", "--top-p", "1.5"], "top_p"),
])
def test_cli_errors_are_one_line_and_nonzero(argv, needle, capsys):
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err
