"""The CLI on a tiny chat model: one-shot generate, info, and the interactive chat's handling of images."""
import subprocess
import sys

import pytest

from pocketvlm.cli import main

from serve_fixtures import make_tiny_qwen2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_qwen2(tmp_path_factory.mktemp("cli_tiny"))


def test_generate_and_info(tiny, capsys):
    assert main(["generate", str(tiny), "-p", "Hello!", "--temperature", "0", "--max-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["info", str(tiny)]) == 0
    out = capsys.readouterr().out
    assert "qwen2" in out and "parameters" in out and "checkpoint" in out


def run_chat(model, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pocketvlm", "chat", str(model), "--temperature", "0",
                           "--max-tokens", "4"], input=stdin, capture_output=True, text=True, timeout=300)


def test_chat_session_survives_bad_image_paths(tiny, tmp_path):
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is text, not a JPEG")
    script = "\n".join([
        "Hello!",
        "/image /no/such/picture.png",
        f"what is in {tmp_path / 'missing.jpg'} ?",
        f"/image {not_image}",
        "/reset",
        "How are you today?",
        "/exit",
    ]) + "\n"
    r = run_chat(tiny, script)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.count("Please check the path") == 3
    assert "(conversation reset)" in out
    assert "Traceback" not in r.stderr


def test_chat_image_to_text_only_model_is_explained(tiny, tmp_path):
    from PIL import Image

    img = tmp_path / "red.png"
    Image.new("RGB", (8, 8), "red").save(img)
    r = run_chat(tiny, f"what colour is {img} ?\nHello!\n")
    assert r.returncode == 0, r.stderr
    assert "text-only" in r.stdout


def test_serve_reads_prompts_in_shorter_prefill_chunks():
    """The server's default chunk is 256 tokens (a running stream waits one chunk of another client's long
    prompt); elsewhere 512; an explicit value wins."""
    from pocketvlm import cli
    from pocketvlm.serve.app import SERVE_PREFILL_CHUNK_SIZE

    ap = cli.build_parser()
    assert ap.parse_args(["serve", "m"]).prefill_chunk_size == SERVE_PREFILL_CHUNK_SIZE == 256
    assert ap.parse_args(["serve", "m", "--prefill-chunk-size", "64"]).prefill_chunk_size == 64
    assert ap.parse_args(["chat", "m"]).prefill_chunk_size == 512
