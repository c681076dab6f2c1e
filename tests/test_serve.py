"""The OpenAI-compatible server and the in-process Engine, with real clients (openai, httpx) against a live
uvicorn server on a free loopback port, serving a tiny random-weight Qwen2 chat model."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from pocketvlm.errors import ImageError, ModelNotFoundError, RequestError, SamplingError
from pocketvlm.serve import schemas
from pocketvlm.serve.app import ServerThread, create_app
from pocketvlm.serve.engine import Engine
from pocketvlm.serve.images import ImagePolicy, check_public_url

sys.path.insert(0, str(Path(__file__).parent))
from serve_common import (  # noqa: E402,F401 - fixtures and helpers
    MAX_BODY, MAX_PIXELS, assert_error, client, data_url, engine, image_dir, image_msg, keyed_server, one_torch_thread,
    pm, png_bytes, png_header_only, post, reference, server, tiny_dir, user, vlm_server)


# --- the OpenAI client against the live server ------------------------------------------------------

def test_openai_non_streaming_matches_direct_generation(client, pm):
    msgs = user("Hello! How are you today?")
    want, last = reference(pm, msgs, 16)
    resp = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.model == "tiny"
    assert isinstance(resp.created, int)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == want and want
    assert resp.choices[0].finish_reason == last.finish_reason
    assert resp.usage.prompt_tokens == last.prompt_tokens and resp.usage.completion_tokens == last.completion_tokens
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    # max_completion_tokens is the newer spelling of max_tokens
    r2 = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=3, temperature=0)
    assert r2.usage.completion_tokens <= 3


def test_finish_reason_stop_at_eos_and_stop_string(client, pm):
    msgs = user("The quick brown fox")
    full, _ = reference(pm, msgs, 24)
    # a stop string taken from the greedy answer itself: the answer must end right before it
    stop = full[6:10]
    assert len(stop) == 4 and stop in full
    resp = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0, stop=[stop])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content == full[:full.index(stop)]


def test_openai_streaming(client, pm):
    msgs = user("Describe the sky")
    want, last = reference(pm, msgs, 12)
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == want
    assert with_choices[-1].choices[0].finish_reason == last.finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == last.completion_tokens
    assert chunks[-1].usage.total_tokens == last.prompt_tokens + last.completion_tokens


def test_openai_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="no-such-model", messages=user("hi"))
    assert "no-such-model" in str(ei.value) and "tiny" in str(ei.value)


def test_openai_models_list_and_health(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny"]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["models"] == ["tiny"]


def test_text_only_model_refuses_images_with_clear_400(client):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="tiny", messages=image_msg(data_url(png_bytes())))
    assert "text-only" in str(ei.value)


# --- raw HTTP: SSE framing, errors, auth, limits -----------------------------------------------------

def test_sse_framing(server):
    body = {"model": "tiny", "messages": user("Count: one two"), "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    objs = [json.loads(e[6:]) for e in events[:-1]]
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert objs[-1]["choices"][0]["delta"] == {} and objs[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in o for o in objs)  # only with stream_options.include_usage
    assert all(o["object"] == "chat.completion.chunk" and o["model"] == "tiny" for o in objs)


@pytest.mark.parametrize("body,param,contains", [
    ({"model": "tiny"}, "messages", "required"),
    ({"model": "tiny", "messages": []}, "messages", "non-empty"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0].type",
     "unsupported"),
    ({"model": "tiny", "messages": user("x"), "temperature": -0.5}, "temperature", "temperature"),
    ({"model": "tiny", "messages": user("x"), "temperature": "hot"}, "temperature", "number"),
    ({"model": "tiny", "messages": user("x"), "top_p": 0}, "top_p", "top_p"),
    ({"model": "tiny", "messages": user("x"), "max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"model": "tiny", "messages": user("x"), "max_tokens": 2.5}, "max_tokens", "integer"),
    ({"model": "tiny", "messages": user("x"), "n": 2}, "n", "n=1"),
    ({"model": "tiny", "messages": user("x"), "stop": [1, 2]}, "stop", "stop"),
    ({"model": "tiny", "messages": user("x"), "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most"),
    ({"model": "tiny", "messages": user("x"), "seed": "x"}, "seed", "integer"),
    ({"model": "tiny", "messages": user("x"), "stream": "yes"}, "stream", "stream"),
    ({"model": "tiny", "messages": user("x"), "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ({"model": "tiny", "messages": user("x"), "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"model": "tiny", "messages": user("x"), "tools": [{"type": "function"}]}, "tools", "not supported"),
])
def test_bad_requests_are_400_with_param(server, body, param, contains):
    assert_error(post(server, body), 400, param=param, contains=contains)


def test_malformed_json_and_unknown_model_and_route(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                   headers={"content-type": "application/json"})
    assert_error(r, 400, code="invalid_json")
    assert_error(post(server, {"model": "ghost", "messages": user("x")}), 404, code="model_not_found", param="model")
    assert_error(httpx.get(server.url + "/v1/nothing-here"), 404)
    assert_error(httpx.get(server.url + "/v1/models/ghost"), 404, code="model_not_found")
    assert httpx.get(server.url + "/v1/models/tiny").json()["id"] == "tiny"


def test_foreign_host_and_non_json_content_type_refused(server):
    """A page on another site cannot drive the local server through a visitor's browser: a rebound domain
    arrives with its own Host name (400), and a cross-site form or text/plain POST is not JSON (415)."""
    body = {"model": "tiny", "messages": user("hi"), "max_tokens": 1}
    assert_error(post(server, body, headers={"Host": "evil.example"}), 400, code="invalid_host")
    assert_error(httpx.get(server.url + "/v1/models", headers={"Host": "evil.example:8000"}), 400,
                 code="invalid_host")
    assert post(server, body, headers={"Host": "localhost"}).status_code == 200
    r = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(body),
                   headers={"Content-Type": "text/plain"})
    assert_error(r, 415, code="unsupported_media_type")
    r = httpx.post(server.url + "/v1/chat/completions", data={"model": "tiny"})  # a form post
    assert_error(r, 415, code="unsupported_media_type")
    r = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(body))  # no Content-Type either
    assert_error(r, 415, code="unsupported_media_type")


def test_other_sites_pages_cannot_post(server, engine):
    """A browser's no-cors POST from another site carries that site's Origin: 403 before anything runs. The
    chat page served here (same origin), clients without an Origin and --allowed-origin front ends pass."""
    body = {"model": "tiny", "messages": user("hi"), "max_tokens": 1}
    for origin in ("https://evil.example", "null", "http://127.0.0.1:1", "file://"):
        assert_error(post(server, body, headers={"Origin": origin}), 403, code="cross_origin")
    port = server.url.rsplit(":", 1)[1]
    assert post(server, body, headers={"Origin": f"http://127.0.0.1:{port}"}).status_code == 200
    assert post(server, body).status_code == 200
    with ServerThread(create_app(engine, allowed_origins=["https://chat.example.org"])) as s:
        assert post(s, body, headers={"Origin": "https://chat.example.org"}).status_code == 200
        assert_error(post(s, body, headers={"Origin": "https://evil.example"}), 403, code="cross_origin")
    assert httpx.get(server.url + "/v1/models", headers={"Origin": "https://evil.example"}).status_code == 200


def test_client_input_never_gives_500(server):
    """Inputs that used to reach an exception: a lone surrogate, a seed past 64 bits, NaN and infinite numbers."""
    cases = [({"messages": [{"role": "user", "content": "hi \ud83d there"}]}, "messages[0].content"),
             ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}, "messages[0].content"),
             ({"stop": ["\ud83d"]}, "stop"), ({"seed": 2 ** 70}, "seed"), ({"seed": -1}, "seed"),
             ({"temperature": "NaN"}, "temperature"), ({"repetition_penalty": "Infinity"}, "repetition_penalty"),
             ({"top_p": "-Infinity"}, "top_p")]
    for extra, param in cases:
        body = {"model": "tiny", "messages": user("hi"), "max_tokens": 1, **extra}
        raw = json.dumps(body).replace('"NaN"', "NaN").replace('"Infinity"', "Infinity").replace('"-Infinity"', "-Infinity")
        r = httpx.post(server.url + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
        assert_error(r, 400, param=param)


def test_internal_errors_keep_their_text_server_side(caplog):
    from pocketvlm.serve.app import error_response_for

    with caplog.at_level("ERROR", logger="pocketvlm.serve"):
        status, body = error_response_for(ValueError("/secret/path and a token"))
    assert status == 500 and "secret" not in body["error"]["message"] and "see the server log" in body["error"]["message"]
    assert "secret" in caplog.text and "ValueError" in caplog.text


def test_prompt_over_context_window_is_400(server, pm):
    long = "one two three four five six seven eight nine ten " * 200
    err = assert_error(post(server, {"model": "tiny", "messages": user(long)}), 400, code="context_length_exceeded")
    assert str(pm.context_window_size) in err["message"]
    # streaming requests get the same status before any event is sent
    err = assert_error(post(server, {"model": "tiny", "messages": user(long), "stream": True}), 400,
                       code="context_length_exceeded")


def test_auth(keyed_server):
    url = keyed_server.url
    body = {"model": "tiny", "messages": user("hi"), "max_tokens": 2}
    assert_error(httpx.post(url + "/v1/chat/completions", json=body), 401, code="invalid_api_key")
    r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert_error(r, 401, code="invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(httpx.get(url + "/v1/models"), 401)
    # the key is checked before the body is read: a body over the 32 MiB limit without a key is 401, not 413
    r = httpx.post(url + "/v1/chat/completions", content=b"{" + b" " * (33 * 1024 * 1024) + b"}",
                   headers={"Content-Type": "application/json"})
    assert_error(r, 401, code="invalid_api_key")
    r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer sekret"}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    assert httpx.get(url + "/health").status_code == 200  # liveness needs no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
    assert ok.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2).usage.completion_tokens >= 1


def test_body_limit_is_413(server):
    big = {"model": "tiny", "messages": user("x" * (MAX_BODY + 10))}
    assert_error(post(server, big), 413, code="request_too_large")

    def chunked():  # no Content-Length: the limit is counted while reading
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 65536):
            yield payload[i:i + 65536]
    r = httpx.post(server.url + "/v1/chat/completions", content=chunked(), timeout=60,
                   headers={"Content-Type": "application/json"})
    assert_error(r, 413, code="request_too_large")


def test_image_limits_are_413_and_bad_images_400(server):
    # decoded pixel count over --max-image-pixels, from a small compressed file
    big = png_bytes(2000, 1000)
    assert len(big) < MAX_BODY
    assert_error(post(server, {"model": "tiny", "messages": image_msg(data_url(big))}), 413, code="image_too_large")
    # a header claiming 40000 x 40000 pixels: refused from the header, before decoding
    bomb = png_header_only(40000, 40000)
    assert_error(post(server, {"model": "tiny", "messages": image_msg(data_url(bomb))}), 413, code="image_too_large")
    # not an image / broken data URL
    assert_error(post(server, {"model": "tiny", "messages": image_msg(data_url(b"not an image at all"))}), 400,
                 code="invalid_image")
    assert_error(post(server, {"model": "tiny", "messages": image_msg("data:image/png;base64,@@@")}), 400,
                 code="invalid_image")
    assert_error(post(server, {"model": "tiny", "messages": image_msg("ftp://example.com/a.png")}), 400,
                 code="invalid_image", contains="scheme")


def test_local_image_paths_only_inside_allowed_dir(server, image_dir):
    def send(url):
        return post(server, {"model": "tiny", "messages": image_msg(url)})
    # inside the folder: the image passes the policy, then the text-only model refuses it
    assert_error(send(str(image_dir / "red.png")), 400, contains="text-only")
    assert_error(send("red.png"), 400, contains="text-only")  # relative to the allowed folder
    assert_error(send("file://" + str(image_dir / "red.png")), 400, contains="text-only")
    # outside: by "..", by absolute path, by a symlink inside the folder pointing out
    for bad in ["../secret.png", str(image_dir / ".." / "secret.png"), str(image_dir.parent / "secret.png"),
                str(image_dir / "link.png"), "/etc/passwd"]:
        assert_error(send(bad), 400, code="invalid_image", contains="outside the allowed image folder")
    assert_error(send(str(image_dir / "missing.png")), 400, contains="not found")


def test_local_paths_refused_without_allowed_dir(pm):
    pol = ImagePolicy()
    with pytest.raises(ImageError, match="--allowed-image-dir"):
        pol.load(__file__)


def test_remote_images_off_by_default(server):
    err = assert_error(post(server, {"model": "tiny", "messages": image_msg("http://example.com/cat.png")}), 400)
    assert "--allow-remote-images" in err["message"]


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x.png", "http://localhost:8000/x.png", "http://10.1.2.3/x.png", "http://192.168.1.1/x.png",
    "http://172.16.0.5/x.png", "http://169.254.169.254/latest/meta-data", "http://[::1]/x.png",
    "http://0.0.0.0/x.png", "http://[::ffff:127.0.0.1]/x.png", "http://100.64.0.1/x.png", "http://[fe80::1]/x.png",
    "http://224.0.0.1/x.png", "http://240.0.0.1/x.png",
])
def test_remote_urls_to_private_addresses_refused(url):
    literal = "localhost" not in url  # for a name, the message does not say what it resolves to
    with pytest.raises(ImageError, match="non-public address" if literal else "does not resolve to a public"):
        check_public_url(url)


def test_public_address_passes_the_check():
    assert check_public_url("https://93.184.216.34/cat.png") is True
    assert check_public_url("http://[2606:4700::1111]/cat.png") is True


@pytest.fixture()
def local_http():
    """A plain HTTP server on 127.0.0.1 serving /cat.png, /big.png (over the byte cap) and /redirect (to ::1)."""
    import http.server

    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", f"http://[::1]:{self.server.server_port}/cat.png")
                self.end_headers()
                return
            data = png_bytes(64, 64) if self.path == "/cat.png" else b"\0" * 5000
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_port}", hits
    httpd.shutdown()
    httpd.server_close()


def test_remote_fetch_checks_every_connection(local_http, monkeypatch):
    """Treat 127.0.0.1 (only) as public to exercise the fetch path offline: the image arrives; the byte cap
    holds; a redirect to a private address is refused; and an address that turns private between the check
    and the connection (DNS rebinding) is refused at connect time."""
    from pocketvlm.errors import ImageTooLargeError
    from pocketvlm.serve import images as eng

    base, hits = local_http
    real = eng._is_public
    monkeypatch.setattr(eng, "_is_public", lambda ip: str(ip) == "127.0.0.1" or real(ip))
    pol = ImagePolicy(allow_remote=True, max_bytes=4096)
    assert pol.load(base + "/cat.png").size == (64, 64)
    with pytest.raises(ImageTooLargeError):
        pol.load(base + "/big.png")
    with pytest.raises(ImageError, match="'::1': it is a non-public address"):
        pol.load(base + "/redirect")
    assert hits == ["/cat.png", "/big.png", "/redirect"]  # the redirect target was never requested

    calls = []

    def rebinding(ip):  # public when first checked, private when the connection is made
        calls.append(ip)
        return len(calls) == 1
    monkeypatch.setattr(eng, "_is_public", rebinding)
    with pytest.raises(ImageError, match="non-public address"):
        pol.load(base + "/cat.png")
    assert len(calls) == 2 and hits == ["/cat.png", "/big.png", "/redirect"]


def test_remote_fetch_to_loopback_refused_through_server(engine, pm):
    """With --allow-remote-images, an image URL pointing at this machine is refused before any connection."""
    hits = []

    class Handler(__import__("http.server").server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            data = png_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    import http.server
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    e2 = Engine({"tiny": pm}, slots=1, allow_remote_images=True, allow_local_images=False)
    try:
        with ServerThread(create_app(e2)) as s:
            url = f"http://127.0.0.1:{httpd.server_port}/cat.png"
            err = assert_error(post(s, {"model": "tiny", "messages": image_msg(url)}), 400, code="invalid_image")
            assert "non-public address" in err["message"]
        assert hits == []  # never connected
    finally:
        e2.close()
        httpd.shutdown()
        httpd.server_close()


# --- a vision-language model: images as data URLs, one and two per message -----------------------------

def test_vlm_answers_about_one_and_two_images(vlm_server):
    s, vpm = vlm_server
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
    red, blue = data_url(png_bytes(40, 30, (220, 20, 20))), data_url(png_bytes(30, 40, (20, 20, 220)))
    one = image_msg(red, "What is in this picture?")
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": red}},
                                        {"type": "image_url", "image_url": {"url": blue}},
                                        {"type": "text", "text": "Compare the two pictures."}]}]
    for msgs in (one, two):
        want, last = reference(vpm, msgs, 12)  # the Python API on its own, images given as data URLs
        r = c.chat.completions.create(model="vlm", messages=msgs, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == want
        assert r.usage.prompt_tokens == last.prompt_tokens
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="vlm", messages=msgs, max_tokens=12, temperature=0, stream=True))
        assert streamed == want
    n_img = vpm.model.num_image_tokens()
    p1 = c.chat.completions.create(model="vlm", messages=one, max_tokens=1).usage.prompt_tokens
    p2 = c.chat.completions.create(model="vlm", messages=two, max_tokens=1).usage.prompt_tokens
    assert p2 - p1 >= n_img  # the second image's feature rows are in the prompt


def test_vlm_image_from_allowed_dir_and_bad_images(vlm_server, image_dir):
    s, vpm = vlm_server
    msgs = image_msg(str(image_dir / "red.png"))
    r = post(s, {"model": "vlm", "messages": msgs, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > vpm.model.num_image_tokens()
    assert_error(post(s, {"model": "vlm", "messages": image_msg(str(image_dir / "link.png"))}), 400,
                 contains="outside the allowed image folder")
    assert_error(post(s, {"model": "vlm", "messages": image_msg(data_url(png_bytes()[:40]))}), 400,
                 code="invalid_image")
    assert_error(post(s, {"model": "vlm", "messages": image_msg(data_url(png_header_only(9000, 9000)))}), 413)


# --- in-process Engine -------------------------------------------------------------------------------

def test_engine_openai_shaped_objects(engine, pm):
    msgs = user("Hello! How are you today?")
    want, last = reference(pm, msgs, 10)
    resp = engine.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert resp.choices[0].message.content == want
    assert resp.usage.total_tokens == last.prompt_tokens + last.completion_tokens
    assert resp.model_dump()["object"] == "chat.completion"
    chunks = list(engine.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == last.finish_reason
    assert [m.id for m in engine.models.list().data] == ["tiny"]
    # the only model is the default
    default = engine.chat.completions.create(messages=msgs, max_tokens=10, temperature=0)
    assert default.choices[0].message.content == want


def test_engine_errors_and_early_close(engine):
    with pytest.raises(ModelNotFoundError):
        engine.chat.completions.create(model="ghost", messages=user("x"))
    with pytest.raises(RequestError):
        engine.chat.completions.create(model="tiny", messages="not a list")
    with pytest.raises(SamplingError):
        engine.chat.completions.create(model="tiny", messages=user("x"), top_p=2)
    stream = engine.chat.completions.create(model="tiny", messages=user("Hello!"), max_tokens=900, stream=True)
    next(stream)
    stream.close()  # stops the generation
    deadline = time.monotonic() + 10
    while engine.schedulers["tiny"].stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.schedulers["tiny"].stats()["active"] == 0


def test_engine_in_process_image_sources(pm, image_dir):
    secret = str(image_dir.parent / "secret.png")
    with Engine({"tiny": pm}, slots=1) as e:  # in-process default: any local path, no remote URLs
        with pytest.raises(ImageError, match="text-only"):  # the image loaded; the text model then refuses it
            e.chat.completions.create(messages=image_msg(secret))
        with pytest.raises(ImageError, match="remote image URLs are disabled"):
            e.chat.completions.create(messages=image_msg("http://example.com/a.png"))
    with Engine({"tiny": pm}, slots=1, allowed_image_dir=image_dir) as e:  # a folder restricts
        with pytest.raises(ImageError, match="outside the allowed image folder"):
            e.chat.completions.create(messages=image_msg(secret))


def test_engine_loads_sources_by_folder_name(tiny_dir):
    with Engine([str(tiny_dir)], slots=1) as e:
        assert e.model_ids == [tiny_dir.name]
        r = e.chat.completions.create(messages=user("hi"), max_tokens=2)
        assert r.model == tiny_dir.name and r.usage.completion_tokens >= 1
    with pytest.raises(ModelNotFoundError):
        Engine({"x": str(tiny_dir) + "-missing"})


def test_schema_objects_attribute_access():
    c = schemas.completion("chatcmpl-1", "m", "hi", "stop", 3, 1)
    assert c.choices[0].message.content == "hi" and c.usage.total_tokens == 4
    k = schemas.chunk("chatcmpl-1", "m", 1, {})
    assert k.choices[0].delta.content is None  # absent optional fields read as None, like openai's objects


# --- the command line --------------------------------------------------------------------------------

def test_cli_serve_defaults_are_safe():
    from pocketvlm.cli import build_parser

    a = build_parser().parse_args(["serve", "some-model"])
    assert a.host == "127.0.0.1" and a.api_key is None and not a.allow_remote_images and a.allowed_image_dir is None
    assert a.allowed_host is None  # cmd_serve then accepts only loopback Host names (tested in the subprocess)
    assert (a.header_timeout, a.body_timeout, a.max_connections_per_client) == (10, 30, 32)  # slow clients
    assert a.model == ["some-model"]


def test_cli_serve_subprocess(tiny_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "pocketvlm", "serve", str(tiny_dir), "--model-id", "tiny-cli",
                             "--port", str(port), "--api-key", "k1", "--slots", "2", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health", headers={"Host": "rebound.example"}).status_code == 400
        c = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny-cli"]
        r = c.chat.completions.create(model="tiny-cli", messages=user("hi"), max_tokens=3)
        assert r.usage.completion_tokens >= 1
        assert httpx.get(url + "/health").json()["schedulers"]["tiny-cli"]["slots"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=20)
