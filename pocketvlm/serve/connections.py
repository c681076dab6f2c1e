"""Limits on connections, below the HTTP application: how long a client may take to send a request's head
and its body, and how many connections one client may hold open.

uvicorn closes a keep-alive connection left idle after a response, but not one whose request never ends: a
client that opens connections and sends a header line now and then (slowloris), or announces a body and
trickles it, holds each connection, its file descriptor and buffers, for as long as it likes. The server
runs uvicorn's h11 protocol (also where httptools is installed) with the missing deadlines added, read from
h11's own state (nothing is parsed here):

- head: a request's line and headers must be complete within ``header_timeout`` seconds of the connection
  opening or of the previous response ending;
- body: the body must be complete within ``body_timeout`` seconds of the head, plus one second per
  ``BODY_BYTES_PER_EXTRA_SECOND`` bytes received, so that a large upload on a slow but working link is
  not cut off while a trickle is;
- per client: at most ``max_per_client`` open connections from one address (an IPv6 client's /64, which a
  single host may own whole); one more is answered 503 with ``Retry-After`` at once and closed.

A connection past a deadline is answered 408 and closed (silently if the client sent nothing: an idle
preconnection). The time to generate and stream an answer is not limited here: the scheduler's queue limit
and the client's own disconnect govern that.

Behind a reverse proxy every client has the proxy's address: raise ``--max-connections-per-client`` or set
it to 0 (no cap) and let the proxy limit connections per client.
"""
from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import logging
from dataclasses import dataclass

from ..errors import RequestError
from . import schemas

DEFAULT_HEADER_TIMEOUT = 10.0  # a request head is a few hundred bytes: even a poor mobile link sends it in 1-2 s
DEFAULT_BODY_TIMEOUT = 30.0  # a 2 MB photo as base64 on a 2 Mbit/s uplink: ~11 s, before the extension below
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 32  # browsers open 6 per host; 8x the default slots of one model
BODY_BYTES_PER_EXTRA_SECOND = 64 * 1024  # a body may take 1 s longer per 64 KiB received (a 512 kbit/s floor)
#: Seconds a client told 503 (server busy, or too many connections) should wait before retrying.
RETRY_AFTER_S = 1
#: How long an over-the-cap connection is kept after its 503, reading and dropping what the client sends, so
#: that closing it with unread data (a TCP reset) does not destroy the answer before the client reads it.
REFUSED_LINGER_S = 1.0
log = logging.getLogger("pocketvlm.serve")


@dataclass(frozen=True)
class ConnectionLimits:
    """Deadlines for a request's head and body and the cap on one client's open connections (0: no cap)."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT

    def __post_init__(self):
        if not (self.header_timeout > 0 and self.body_timeout > 0):
            raise RequestError(f"--header-timeout and --body-timeout must be > 0 seconds (got "
                               f"{self.header_timeout:g} and {self.body_timeout:g})")
        if self.max_per_client < 0:
            raise RequestError(f"--max-connections-per-client must be >= 0 (0: no cap), got {self.max_per_client}")

    def uvicorn_config(self, app, **kwargs):
        """A ``uvicorn.Config`` serving ``app`` over h11 with these limits (``kwargs``: host, port, ...)."""
        import uvicorn

        # ws="none": the app serves no WebSocket, and an upgraded connection would leave this protocol
        # without telling it, so its per-client count would never go down.
        return uvicorn.Config(app, http=_limited_h11(self), ws="none", **kwargs)


def raw_response(status: int, reason: str, message: str, code: str, *extra: str) -> bytes:
    """A complete HTTP/1.1 response with an OpenAI error body and ``Connection: close``, as bytes: for
    connections whose request never reached the application."""
    body = json.dumps(schemas.error_body(message, code=code)).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def client_key(peername) -> str | None:
    """What the per-client cap counts by: the remote IP address, an IPv6 client's /64 network; None for
    connections without an IP address (a Unix socket)."""
    if not isinstance(peername, tuple) or not peername:
        return None
    try:
        ip = ipaddress.ip_address(str(peername[0]).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Refused(asyncio.Protocol):
    """A connection over its client's cap: answered 503 with ``Retry-After`` at once, then closed when the
    client closes its side or after ``REFUSED_LINGER_S``; what it sends meanwhile is dropped."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, cap: int):
        self.transport = transport
        transport.write(raw_response(
            503, "Service Unavailable", f"too many open connections from your address (at most {cap}); close "
            "some or retry later", "too_many_connections", f"retry-after: {RETRY_AFTER_S}"))
        self.timer = loop.call_later(REFUSED_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc) -> None:
        self.timer.cancel()


def _limited_h11(limits: ConnectionLimits):
    """A subclass of uvicorn's H11Protocol with ``limits``, and its own count of each client's connections
    (one class per server)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    open_per_client: collections.Counter = collections.Counter()

    class LimitedH11Protocol(H11Protocol):
        phase = None  # "head", "body", or None while the application has the request
        timer = None
        key = None
        started = 0.0  # loop time the phase began
        received = 0  # bytes received since

        def connection_made(self, transport):
            key = client_key(transport.get_extra_info("peername"))
            if key is not None and limits.max_per_client and open_per_client[key] >= limits.max_per_client:
                log.info("refused a connection from %s: %d already open", key, open_per_client[key])
                transport.set_protocol(Refused(transport, self.loop, limits.max_per_client))
                return
            if key is not None:
                self.key = key
                open_per_client[key] += 1
            super().connection_made(transport)
            self._track()

        def connection_lost(self, exc):
            self._enter(None)
            if self.key is not None:
                open_per_client[self.key] -= 1
                if not open_per_client[self.key]:
                    del open_per_client[self.key]
                self.key = None
            super().connection_lost(exc)

        def data_received(self, data):
            self.received += len(data)
            super().data_received(data)
            self._track()

        def on_response_complete(self):
            super().on_response_complete()  # may start the next (pipelined) request
            self._track()

        def _track(self):
            """Follow the client's side of h11's state machine: IDLE = the head is being read, SEND_BODY = the
            body; anything else = the application has the request, or the connection is over."""
            state = self.conn.their_state
            phase = "head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
            self._enter(None if self.transport.is_closing() else phase)

        def _enter(self, phase):
            if phase == self.phase:
                return
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.phase, self.started, self.received = phase, self.loop.time(), 0
            if phase is not None:
                timeout = limits.header_timeout if phase == "head" else limits.body_timeout
                self.timer = self.loop.call_later(timeout, self._expired)

        def _expired(self):
            self.timer = None
            if self.phase == "body":  # the deadline moves on with the bytes received
                left = (self.started + limits.body_timeout + self.received / BODY_BYTES_PER_EXTRA_SECOND
                        - self.loop.time())
                if left > 0:
                    self.timer = self.loop.call_later(left, self._expired)
                    return
            if self.transport.is_closing():
                return
            what, option = (("head", f"{limits.header_timeout:g} s (--header-timeout)") if self.phase == "head"
                            else ("body", f"{limits.body_timeout:g} s and 1 s per 64 KiB received (--body-timeout)"))
            log.info("closing a connection from %s: the request %s was not complete after %.1f s", self.key, what,
                     self.loop.time() - self.started)
            answering = what == "body" and self.cycle is not None and self.cycle.response_started
            if self.received and not answering:
                self.transport.write(raw_response(
                    408, "Request Timeout", f"the request {what} did not arrive within {option}; "
                    "send the whole request at once, or check the network", "request_timeout"))
            self.transport.close()  # connection_lost tells a waiting application the client is gone

    return LimitedH11Protocol


__all__ = ["ConnectionLimits", "client_key", "raw_response", "DEFAULT_BODY_TIMEOUT", "DEFAULT_HEADER_TIMEOUT",
           "DEFAULT_MAX_CONNECTIONS_PER_CLIENT", "RETRY_AFTER_S"]
