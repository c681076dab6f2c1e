"""Slow and greedy clients (issue 17): request heads and bodies that trickle are answered 408 and closed at
their deadline, without slowing other clients; one address may hold only so many connections. The servers
here run the same uvicorn configuration as ``pocketvlm serve`` (``ServerThread`` takes its limits), with
short timeouts to keep the tests quick. Slow clients come from several loopback addresses (127.0.0.2, ...),
as they would from several machines, so that the timeouts, not the per-client cap, are what is tested."""
from __future__ import annotations

import json
import selectors
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from pocketvlm.errors import RequestError
from pocketvlm.serve.app import ServerThread, create_app
from pocketvlm.serve.connections import ConnectionLimits, client_key

sys.path.insert(0, str(Path(__file__).parent))
from serve_common import engine, image_dir, one_torch_thread, pm, tiny_dir, user  # noqa: E402,F401 - fixtures

HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "  # then one byte at a time, never the blank line
BODY = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n{")  # then one byte at a time, never the 100000th


class SlowClients:
    """Connections that send the start of a request, then one byte every ``period`` s; ``ended[i]`` = (seconds
    from opening until the server answered or closed connection i, the first bytes it sent back)."""

    def __init__(self, port: int, starts: list[bytes], sources: list[str], period: float = 0.5):
        self.socks, self.opened, self.ended = [], [], {}
        for i, start in enumerate(starts):
            s = socket.socket()
            s.bind((sources[i % len(sources)], 0))
            s.connect(("127.0.0.1", port))
            s.sendall(start)
            s.setblocking(False)
            self.socks.append(s)
            self.opened.append(time.monotonic())
        self.period, self.stop = period, threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self):
        with selectors.DefaultSelector() as sel:  # sees an answer or a close the moment it comes
            for i, s in enumerate(self.socks):
                sel.register(s, selectors.EVENT_READ, i)
            while not self.stop.is_set():
                next_byte = time.monotonic() + self.period
                while (wait := next_byte - time.monotonic()) > 0 and not self.stop.is_set():
                    for key, _ in sel.select(min(wait, 0.1)):
                        i = key.data
                        try:
                            got = key.fileobj.recv(200)  # the server's answer, or b"" (closed)
                        except OSError as e:  # reset
                            got = repr(e).encode()
                        self.ended[i] = (time.monotonic() - self.opened[i], got)
                        sel.unregister(key.fileobj)
                for i, s in enumerate(self.socks):
                    if i not in self.ended:
                        try:
                            s.send(b"a")
                        except OSError:
                            pass

    def close(self):
        self.stop.set()
        self.thread.join()
        for s in self.socks:
            s.close()


def _median_request_s(url: str, n: int = 40, spacing: float = 0.025) -> float:
    """Median seconds of GET /health, each on a new connection (as a new client would), one every ``spacing``
    s (so that the requests meet the slow clients' bytes)."""
    times = []
    with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=30) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            assert c.get(url + "/health").status_code == 200
            times.append(time.perf_counter() - t0)
            time.sleep(spacing)
    return statistics.median(times)


def test_slow_clients_do_not_slow_others_and_are_closed_at_their_deadline(engine):
    """200 slow connections (100 trickling a request head, 100 a request body) from 10 addresses: a normal
    request takes at most twice as long as alone, and each slow connection gets 408 and is closed at its
    deadline (head: --header-timeout from connecting; body: --body-timeout from the head, +1 s per 64 KiB:
    nothing here)."""
    limits = ConnectionLimits(header_timeout=3.0, body_timeout=4.0)
    with ServerThread(create_app(engine), limits=limits) as s:
        _median_request_s(s.url, 5)  # warm up
        alone = _median_request_s(s.url)
        slow = SlowClients(s.port, [HEAD, BODY] * 100, [f"127.0.0.{i}" for i in range(2, 12)])
        try:
            time.sleep(0.3)  # the server has taken them all in: what is measured is their trickle
            loaded = _median_request_s(s.url)  # ~1.2 s: two rounds of 200 bytes
            assert not slow.ended, "slow connections closed during the measurement: it was not under load"
            deadline = time.monotonic() + limits.body_timeout + 5
            while len(slow.ended) < 200 and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            slow.close()
    heads = [slow.ended.get(i) for i in range(0, 200, 2)]
    bodies = [slow.ended.get(i) for i in range(1, 200, 2)]

    def spread(ended):
        t = [e[0] for e in ended if e]
        return f"{len(t)} closed after {min(t):.2f}-{max(t):.2f} s" if t else "none closed"
    print(f"\nGET /health alone {alone * 1e3:.2f} ms, beside 200 slow connections {loaded * 1e3:.2f} ms; "
          f"slow heads: {spread(heads)}, slow bodies: {spread(bodies)}")
    assert loaded <= 2 * alone, (alone, loaded)
    for ended, timeout in [(heads, limits.header_timeout), (bodies, limits.body_timeout)]:
        assert all(e is not None for e in ended), "slow connections still open after their deadline"
        # closed by the deadline, not before it (up to 0.1 s early: the client starts its clock before the
        # server accepts), and soon after it (scheduling slack on a busy machine)
        assert all(timeout - 0.1 <= t <= timeout + 1.0 for t, _ in ended), sorted(t for t, _ in ended)
        assert all(got.startswith(b"HTTP/1.1 408 Request Timeout") for _, got in ended), {g for _, g in ended}


def _raw(port: int, request: bytes, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.sendall(request)
    return s


def _read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def _read_response(s: socket.socket) -> bytes:
    """One whole response with a Content-Length from a connection that stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    while len(data) < len(head) + 4 + length:
        data += s.recv(65536)
    return data


def test_idle_and_keep_alive_connections_have_the_head_deadline_too(engine):
    """A connection that sends nothing is closed without an answer at the head deadline (an idle
    preconnection); on a kept-alive connection the next request's head has the same deadline, counted from
    the previous answer (uvicorn's keep-alive timer stops at the first byte)."""
    with ServerThread(create_app(engine), limits=ConnectionLimits(header_timeout=1.0)) as s:
        idle = _raw(s.port, b"")
        t0 = time.monotonic()
        assert _read_all(idle) == b"" and 0.9 <= time.monotonic() - t0 < 3
        kept = _raw(s.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = _read_response(kept)
        t0 = time.monotonic()
        assert first.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in first
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        rest = _read_all(kept)
        assert rest.startswith(b"HTTP/1.1 408") and 0.9 <= time.monotonic() - t0 < 3, rest
        err = json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]
        assert err["code"] == "request_timeout" and "--header-timeout" in err["message"]


def test_a_slow_but_steady_upload_is_not_cut_off(engine):
    """The body deadline grows by 1 s per 64 KiB received: 320 KB sent in 5 pieces over 2 s passes a 1 s
    --body-timeout and gets its answer."""
    body = json.dumps({"model": "tiny", "messages": user("Hello!"), "max_tokens": 2}).encode() + b" " * 320_000
    with ServerThread(create_app(engine), limits=ConnectionLimits(body_timeout=1.0)) as s:
        c = _raw(s.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(5):
            time.sleep(0.4)
            c.sendall(body[i * 64_000:(i + 1) * 64_000] if i < 4 else body[4 * 64_000:])
        answer = _read_all(c)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["usage"]["completion_tokens"] >= 1


def test_connections_over_the_per_client_cap_get_503_at_once(engine):
    """With --max-connections-per-client 4: a fifth connection from 127.0.0.2 is answered 503 with Retry-After
    and closed at once, another address is served meanwhile, and closing one of the four makes room."""
    with ServerThread(create_app(engine), limits=ConnectionLimits(max_per_client=4)) as s:
        held = [_raw(s.port, b"GET /health HTTP/1.1\r\n", "127.0.0.2") for _ in range(4)]
        time.sleep(0.2)  # the server has accepted them
        from_2 = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=10)
        t0 = time.perf_counter()
        r = from_2.get(s.url + "/health")
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and time.perf_counter() - t0 < 1
        assert r.json()["error"]["code"] == "too_many_connections" and "at most 4" in r.json()["error"]["message"]
        silent = _raw(s.port, b"", "127.0.0.2")  # one that sends nothing still gets the answer and the close
        t0 = time.monotonic()
        assert _read_all(silent).startswith(b"HTTP/1.1 503") and time.monotonic() - t0 < 3
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200  # 127.0.0.1 is another client
        held.pop().close()
        deadline = time.monotonic() + 5
        while (r := from_2.get(s.url + "/health")).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.status_code == 200
        from_2.close()
        for h in held + [silent]:
            h.close()


def test_client_key_and_limit_values():
    assert client_key(("203.0.113.7", 5000)) == "203.0.113.7"
    assert client_key(("::ffff:203.0.113.7", 5000, 0, 0)) == "203.0.113.7"
    assert client_key(("2001:db8:1:2:aaaa::1", 5000, 0, 0)) == client_key(("2001:db8:1:2:bbbb::9", 1, 0, 0)) \
        == "2001:db8:1:2::/64"
    assert client_key("/run/pocketvlm.sock") is None
    with pytest.raises(RequestError, match="--header-timeout"):
        ConnectionLimits(header_timeout=0)
    with pytest.raises(RequestError, match="--max-connections-per-client"):
        ConnectionLimits(max_per_client=-1)
