"""The server's image work per request is bounded before any pixel is decoded (count, pixels in all, aspect
ratio), and the memory of decoded images goes back after the request; refused image URLs do not tell the
client what this network's names resolve to (split from test_serve.py, same fixtures)."""
from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from pocketvlm.errors import ImageError
from pocketvlm.serve.app import ServerThread, create_app
from pocketvlm.serve.engine import Engine
from pocketvlm.serve.images import check_public_url

sys.path.insert(0, str(Path(__file__).parent))
from serve_common import (  # noqa: E402,F401 - fixtures and helpers
    assert_error, data_url, image_dir, image_msg, one_torch_thread, pm, png_bytes, post, tiny_dir, vlm_server)


def _rss() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))


def _peak_growth(fn):
    """(result of fn(), peak RSS growth of this process while it ran, growth left after it): the server runs
    in this process."""
    import gc

    gc.collect()
    base, peak, stop = _rss(), [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    t = threading.Thread(target=watch)
    t.start()
    try:
        out = fn()
    finally:
        stop.set()
        t.join()
    gc.collect()
    return out, max(peak[0], _rss()) - base, _rss() - base


def test_image_work_per_request_is_bounded_before_decoding(vlm_server):
    """Small requests cannot make the server decode gigabytes: at most 8 images per request, 2 x the per-image
    pixel cap in all, sides at most 50 : 1 apart; all checked from the headers before any pixel is decoded.
    Measured here as this process's RSS while the in-process server answers."""
    s, vpm = vlm_server
    huge = png_bytes(5000, 5000)  # 25 megapixels (the default cap) in a few KB; 75 MB once decoded
    strip = png_bytes(100000, 1)
    assert len(huge) < 200_000 and len(strip) < 10_000

    def send(*images):
        content = [{"type": "image_url", "image_url": {"url": data_url(b)}} for b in images]
        return post(s, {"model": "vlm", "max_tokens": 1, "messages": [
            {"role": "user", "content": content + [{"type": "text", "text": "What is this?"}]}]})

    r, grew, _ = _peak_growth(lambda: send(*[huge] * 16))
    assert_error(r, 413, code="image_too_large", contains="16 images")
    assert grew < 100 * 2 ** 20, grew
    r, grew, _ = _peak_growth(lambda: send(*[huge] * 3))  # 75 megapixels in all
    assert_error(r, 413, code="image_too_large", contains="per request")
    assert grew < 100 * 2 ** 20, grew
    r, grew, _ = _peak_growth(lambda: send(strip))
    assert_error(r, 413, code="image_too_large", contains="aspect")
    assert grew < 100 * 2 ** 20, grew
    r, grew, left = _peak_growth(lambda: send(huge, huge))  # at the limit: decoded one by one, then answered
    assert r.status_code == 200, r.text
    print(f"\ntwo 5000x5000 images: peak +{grew / 2 ** 20:.0f} MiB, +{left / 2 ** 20:.0f} MiB after")
    assert grew < 300 * 2 ** 20 and left < 64 * 2 ** 20, (grew, left)


@pytest.fixture()
def internal_dns(monkeypatch):
    """getaddrinfo as on a network with internal names: intranet.corp is 10.20.30.40, dual.corp has a public
    and a private address, gone.corp does not resolve; other names resolve as usual."""
    real = socket.getaddrinfo
    answers = {"intranet.corp": ["10.20.30.40"], "dual.corp": ["93.184.216.34", "fd00::7"]}

    def fake(host, port, *args, **kwargs):
        if host == "gone.corp":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if host in answers:
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                    for a in answers[host]]
        return real(host, port, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", fake)


@pytest.mark.parametrize("host", ["intranet.corp", "dual.corp", "gone.corp"])
def test_refused_image_hosts_do_not_reveal_addresses(internal_dns, host, caplog):
    """An internal name that resolves to a private address and one that does not resolve at all get the same
    message, which names neither the address nor the difference; the server log keeps the address."""
    with caplog.at_level(logging.INFO, logger="pocketvlm.serve"), pytest.raises(ImageError) as ei:
        check_public_url(f"http://{host}/cat.png")
    msg = str(ei.value)
    assert msg == (f"refusing to fetch an image from {host!r}: the name does not resolve to a public address; "
                   "only public http(s) hosts are allowed (check the URL)")
    detail = {"intranet.corp": "10.20.30.40", "dual.corp": "fd00::7", "gone.corp": "Name or service not known"}
    assert detail[host] in caplog.text


def test_refused_image_host_through_the_server(internal_dns, pm, caplog):
    e = Engine({"tiny": pm}, slots=1, allow_remote_images=True, allow_local_images=False)
    try:
        with ServerThread(create_app(e)) as s, caplog.at_level(logging.INFO, logger="pocketvlm.serve"):
            err = assert_error(post(s, {"model": "tiny", "messages": image_msg("http://intranet.corp/x.png")}), 400,
                               code="invalid_image", contains="'intranet.corp'")
    finally:
        e.close()
    assert "10.20.30.40" not in err["message"] and "10.20.30.40" in caplog.text
