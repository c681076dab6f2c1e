"""Where the server takes images from, and how big they may be: data URLs, local files inside an allowed
folder, and http(s) URLs of public hosts only.

Remote fetches resolve the host and refuse loopback, private, link-local, multicast, reserved and unspecified
addresses; the check runs again inside each connection (on the address actually connected to) and on each
redirect, so neither a redirect nor a DNS answer that changes after the first check (DNS rebinding) reaches
this machine or its network. Sizes are checked on the encoded bytes and, from the image header, on the pixel
count before any pixel is decoded (decompression bombs). Per request: at most ``max_images`` images and
``max_request_pixels`` pixels in all, and no image narrower than 1 : ``max_aspect`` (a 100000x1 strip passes a
pixel cap but costs gigabytes to resize), all checked from the headers before the first image is decoded;
:meth:`ImagePolicy.load_all` decodes them one after the other. Oversize images raise ImageTooLargeError (413).
"""
from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import logging
import re
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError, ImageTooLargeError

DEFAULT_MAX_IMAGE_PIXELS = 25_000_000  # 25 megapixels: more than any phone photo, far below a decompression bomb
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_IMAGES = 8  # per request
DEFAULT_MAX_ASPECT = 50  # longest side / shortest side
log = logging.getLogger("pocketvlm.serve")


def check_public_url(url: str) -> bool:
    """Refuse URLs whose host is, or resolves to, a loopback, private, link-local, multicast, reserved or
    unspecified address (server-side request forgery guard). Raises ImageError saying why."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ImageError(f"refusing to fetch {url[:80]!r}: only http(s) URLs with a host name can be fetched")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise ImageError(f"invalid port in {url[:80]!r}") from None
    _public_addresses(parts.hostname, port)
    return True


def _is_public(ip) -> bool:
    return ip.is_global and not (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


def _public_addresses(host: str, port: int) -> list[tuple]:
    """getaddrinfo results for ``host``, all of them public, else ImageError.

    For a host name the client is told neither what it resolves to nor whether it resolves at all (the same
    message for both), so that image URLs cannot be used to map this network's internal names and
    addresses; the server log has the details."""
    try:
        ipaddress.ip_address(host)
        literal = True
    except ValueError:
        literal = False
    refused = ImageError(f"refusing to fetch an image from {host!r}: the name does not resolve to a public "
                         "address; only public http(s) hosts are allowed (check the URL)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as e:
        log.info("image host %r does not resolve: %s", host, e)
        raise refused from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not _is_public(ip):
            if literal:  # the client wrote the address itself
                raise ImageError(f"refusing to fetch an image from {host!r}: it is a non-public address; only "
                                 "public http(s) hosts are allowed")
            log.warning("refused an image URL: its host %r resolves to the non-public address %s", host, ip)
            raise refused
    if not infos:
        log.info("image host %r resolves to no address", host)
        raise refused
    return infos


def _pinned_connection(base):
    """An http.client connection class that resolves and checks the host itself and connects to exactly the
    address it checked, so a DNS answer that changes between check and connect (DNS rebinding) cannot
    reach a private address. Redirects open new connections and are checked the same way."""

    class Pinned(base):
        def connect(self):
            infos = _public_addresses(self.host, self.port)
            err = None
            for family, kind, proto, _, addr in infos:
                sock = socket.socket(family, kind, proto)
                sock.settimeout(self.timeout if isinstance(self.timeout, (int, float)) else None)
                try:
                    sock.connect(addr)
                except OSError as e:
                    sock.close()
                    err = e
                    continue
                if hasattr(self, "_context"):  # HTTPS: TLS with the URL's host name (SNI, certificate check)
                    sock = self._context.wrap_socket(sock, server_hostname=self.host)
                self.sock = sock
                return
            raise err or OSError(f"cannot connect to {self.host}")

    return Pinned


def fetch_public_url(url: str, *, max_bytes: int, timeout: float) -> bytes:
    """GET an http(s) image URL from a public host only (checked at connect time, redirects included)."""
    import http.client
    import urllib.error
    import urllib.request

    check_public_url(url)  # clear message before any connection

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(_pinned_connection(http.client.HTTPConnection), req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(_pinned_connection(http.client.HTTPSConnection), req,
                                context=self._context)

    class Redirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            check_public_url(newurl)
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    opener = urllib.request.OpenerDirector()
    for h in (HTTP(), HTTPS(), Redirect(), urllib.request.HTTPErrorProcessor(),
              urllib.request.HTTPDefaultErrorHandler()):
        opener.add_handler(h)
    req = urllib.request.Request(url, headers={"User-Agent": "pocketvlm", "Accept": "image/*"})
    try:
        with opener.open(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ImageTooLargeError(f"the image at {url[:80]!r} is {int(length):,} bytes, over the limit of "
                                         f"{max_bytes:,}")
            data = resp.read(max_bytes + 1)
    except ImageError:
        raise
    except urllib.error.HTTPError as e:
        raise ImageError(f"could not fetch {url[:80]!r}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, ImageError):
            raise reason from None
        raise ImageError(f"could not fetch {url[:80]!r}: {reason}; check the URL and the network") from None
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"the image at {url[:80]!r} is over the limit of {max_bytes:,} bytes")
    return data


_DATA_URL = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),(.*)$", re.S)


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from and how big they may be.

    ``allow_local_files``: any local path (in-process use). ``allowed_image_dir``: local paths only inside
    this folder, after resolving symlinks (server use; takes precedence over ``allow_local_files``).
    ``allow_remote``: http(s) URLs, public hosts only.
    """

    allow_remote: bool = False
    allow_local_files: bool = False
    allowed_image_dir: str | None = None
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    timeout: float = 10.0
    max_images: int = DEFAULT_MAX_IMAGES
    max_request_pixels: int | None = None  # default: 2 x max_pixels
    max_aspect: float = DEFAULT_MAX_ASPECT

    def load(self, url: str):
        """Bytes of the image at ``url`` checked against the limits, decoded to an RGB PIL image."""
        return self.decode(self.probe(url))

    def probe(self, url: str) -> tuple[bytes, tuple[int, int]]:
        """(bytes, (width, height)) of the image at ``url``, every per-image limit checked from its header:
        no pixel decoded yet."""
        from PIL import Image

        from ..image import SAFE_FORMATS, load_image

        data = self._bytes(url)
        if len(data) > self.max_bytes:
            raise ImageTooLargeError(f"the image is {len(data):,} bytes, over the limit of {self.max_bytes:,}; "
                                     "send a smaller image")
        try:  # header only: refuse a decompression bomb before any pixel is decoded
            with Image.open(io.BytesIO(data), formats=SAFE_FORMATS) as probe:
                w, h = probe.size
        except Image.DecompressionBombError:
            raise ImageTooLargeError(f"the image has too many pixels (over {self.max_pixels:,}); "
                                     "downscale it") from None
        except Exception:  # not an image: load_image says precisely why (it fails before decoding anything)
            load_image(data, max_pixels=self.max_pixels, max_bytes=self.max_bytes)
            raise ImageError("the data is not an image pocketvlm can read") from None
        if w * h > self.max_pixels:
            raise ImageTooLargeError(f"the image is {w}x{h} = {w * h:,} pixels, over the limit of "
                                     f"{self.max_pixels:,}; downscale it first")
        if min(w, h) < 1 or max(w, h) > self.max_aspect * min(w, h):
            raise ImageTooLargeError(f"the image is {w}x{h}: sides more than {self.max_aspect:g} : 1 apart; "
                                     "crop it to a less extreme aspect ratio")
        return data, (w, h)

    def decode(self, probed: tuple[bytes, tuple[int, int]]):
        from ..image import load_image

        return load_image(probed[0], max_pixels=self.max_pixels, max_bytes=self.max_bytes)

    def check_request(self, probed: list[tuple[bytes, tuple[int, int]]]) -> None:
        """The per-request limits on a request's probed images (count, pixels in all)."""
        if len(probed) > self.max_images:
            raise ImageTooLargeError(f"the request has {len(probed)} images; at most {self.max_images} per request")
        cap = self.max_request_pixels or 2 * self.max_pixels
        total = sum(w * h for _, (w, h) in probed)
        if total > cap:
            raise ImageTooLargeError(f"the request's images have {total:,} pixels in all, over the limit of "
                                     f"{cap:,} per request; send fewer or smaller images")

    def _bytes(self, url: str) -> bytes:
        if url.startswith("data:"):
            m = _DATA_URL.match(url)
            if m is None or ";base64" not in m.group(2).lower():
                raise ImageError("malformed data URL; expected data:image/<type>;base64,<data>")
            mime = m.group(1).strip().lower()
            if mime and not mime.startswith("image/"):
                raise ImageError(f"data URL has media type {mime!r}, not an image")
            payload = re.sub(r"\s+", "", m.group(3))
            if len(payload) * 3 // 4 > self.max_bytes:
                raise ImageTooLargeError(f"the data URL image is over the limit of {self.max_bytes:,} bytes; "
                                         "send a smaller image")
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as e:
                raise ImageError(f"data URL is not valid base64 ({e})") from None
        scheme = url.split(":", 1)[0].lower() if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url) else ""
        if scheme in ("http", "https"):
            if not self.allow_remote:
                raise ImageError("remote image URLs are disabled on this server (start it with "
                                 "--allow-remote-images); send the image inline as a data: URL")
            return fetch_public_url(url, max_bytes=self.max_bytes, timeout=self.timeout)
        if scheme == "file":
            url = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
        elif scheme and len(scheme) > 1:  # one letter = a Windows drive
            raise ImageError(f"unsupported image URL scheme {scheme!r}; use a data: URL"
                             + (", an http(s) URL" if self.allow_remote else "")
                             + (" or a local path" if self.allow_local_files or self.allowed_image_dir else ""))
        return self._local(url)

    def _local(self, path: str) -> bytes:
        if not (self.allow_local_files or self.allowed_image_dir):
            raise ImageError("local image paths are not accepted here (start the server with "
                             "--allowed-image-dir DIR); send the image inline as a data: URL")
        p = Path(path).expanduser()
        if self.allowed_image_dir:  # a folder given always restricts, even with allow_local_files
            root = Path(self.allowed_image_dir).resolve()
            if not p.is_absolute():
                p = root / p
            real = p.resolve()  # follows symlinks and "..": what would really be opened
            if not real.is_relative_to(root):
                raise ImageError(f"image path {path!r} is outside the allowed image folder")
            p = real
        if not p.is_file():
            raise ImageError(f"image file not found: {path!r}; check the path")
        size = p.stat().st_size
        if size > self.max_bytes:
            raise ImageTooLargeError(f"image file {path!r} is {size:,} bytes, over the limit of {self.max_bytes:,}")
        return p.read_bytes()


__all__ = ["ImagePolicy", "check_public_url", "fetch_public_url", "DEFAULT_MAX_ASPECT", "DEFAULT_MAX_IMAGE_BYTES",
           "DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_MAX_IMAGES"]
