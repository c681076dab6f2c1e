"""Fixtures and helpers shared by the server tests (test_serve.py, test_serve_concurrency.py): a tiny
random-weight Qwen2 chat model, an Engine and live uvicorn servers on free loopback ports, request helpers."""
from __future__ import annotations

import base64
import io
import struct
import sys
import zlib
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

import pocketvlm
from pocketvlm.serve.app import ServerThread, create_app
from pocketvlm.serve.engine import Engine

sys.path.insert(0, str(Path(__file__).parent))
from serve_fixtures import make_tiny_llava, make_tiny_qwen2  # noqa: E402

MAX_BODY = 2_000_000
MAX_PIXELS = 1_000_000


# --- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's matmuls are too small for threads; on a shared, busy machine two spinning OpenMP
    threads per op make every token several times slower. Restored after this module."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # never_eos: greedy answers run to max_tokens, so a long generation can be interrupted mid-way
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_chat"), max_position_embeddings=1024, never_eos=True)


@pytest.fixture(scope="module")
def pm(tiny_dir):
    return pocketvlm.load(tiny_dir)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    allowed = root / "allowed"
    allowed.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(allowed / "red.png")
    Image.new("RGB", (8, 8), (10, 10, 200)).save(root / "secret.png")  # outside the allowed folder
    (allowed / "link.png").symlink_to(root / "secret.png")
    return allowed


@pytest.fixture(scope="module")
def engine(pm, image_dir):
    e = Engine({"tiny": pm}, slots=4, allow_local_images=False, allowed_image_dir=image_dir,
               max_image_pixels=MAX_PIXELS)
    yield e
    e.close()


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, max_body_bytes=MAX_BODY, allowed_hosts=["127.0.0.1", "localhost"])) as s:
        yield s


@pytest.fixture(scope="module")
def keyed_server(engine):
    """A second app over the same engine (same scheduler), requiring an API key."""
    with ServerThread(create_app(engine, api_key="sekret")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def user(text):
    return [{"role": "user", "content": text}]


def reference(pm, messages, max_tokens):
    """The greedy answer computed directly, on a fresh slot, without the scheduler or the server."""
    prompt = pm.chat_prompt(messages)
    events = list(pm.run(prompt, max_tokens=max_tokens, slot=pm.new_slot(), temperature=0))
    return "".join(e.text for e in events), events[-1]


def png_bytes(w=8, h=8, color=(0, 128, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_header_only(w, h) -> bytes:
    """A PNG whose header claims w x h pixels with almost no pixel data (a decompression-bomb probe)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def image_msg(url, text="What is this?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def post(server, body, **kw):
    kw.setdefault("timeout", 60)
    return httpx.post(server.url + "/v1/chat/completions", json=body, **kw)


def assert_error(r, status, code=None, param=None, contains=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    if contains is not None:
        assert contains in err["message"], err
    return err


@pytest.fixture(scope="module")
def vlm_server(tmp_path_factory, image_dir):
    vpm = pocketvlm.load(make_tiny_llava(tmp_path_factory.mktemp("tiny_llava")))
    assert vpm.is_vlm
    e = Engine({"vlm": vpm}, slots=2, allow_local_images=False, allowed_image_dir=image_dir)
    with ServerThread(create_app(e)) as s:
        yield s, vpm
    e.close()
