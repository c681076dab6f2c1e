"""Serving engine: per-model schedulers and an OpenAI-shaped in-process API.

    from pocketvlm import Engine
    engine = Engine({"qwen": "path/to/model"}, slots=4)
    resp = engine.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "Hi"}])
    print(resp.choices[0].message.content)
    for chunk in engine.chat.completions.create(model="qwen", messages=..., stream=True):
        print(chunk.choices[0].delta.content or "", end="")

The HTTP server (:mod:`pocketvlm.serve.app`) sits on the same :class:`Engine`, so both share one
:class:`Scheduler` per model. A scheduler owns ``slots`` KV caches (``PocketModel.new_slot()``) and one
worker thread. Requests beyond the number of slots wait in a FIFO queue. The worker admits waiting requests
into free slots, then advances every active request by one token, round robin, each through its own
``PocketModel.run(..., slot=slot)`` generator. So no request starves, every request's tokens come from its
own cache (answers at temperature 0 equal the answer the request gets alone), and all torch work stays off
the caller's thread (the server's event loop stays responsive). A cancelled request (client gone, stream
closed early) is dropped at its next turn and its slot is freed.
"""
from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import queue
import re
import socket
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import (ImageError, ImageTooLargeError, ModelNotFoundError, PocketVLMError, RequestError,
                      ServerBusyError)
from . import schemas

DEFAULT_SLOTS = 4
DEFAULT_MAX_WAITING = 256  # queued requests per model beyond the busy slots; more get ServerBusyError (503)
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000  # 25 megapixels: more than any phone photo, far below a decompression bomb
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024


# --- images ------------------------------------------------------------------------------------------

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
    """getaddrinfo results for ``host``, all of them public, else ImageError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as e:
        raise ImageError(f"cannot resolve the image host {host!r} ({e}); check the URL") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not _is_public(ip):
            raise ImageError(f"refusing to fetch an image from {host!r}: it resolves to the non-public address "
                             f"{ip}; only public http(s) hosts are allowed")
    if not infos:
        raise ImageError(f"cannot resolve the image host {host!r}")
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
    for h in (HTTP(), HTTPS(), Redirect(), urllib.request.HTTPErrorProcessor(), urllib.request.HTTPDefaultErrorHandler()):
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
    this folder, after resolving symlinks (server use; takes precedence over ``allow_local_files``). ``allow_remote``: http(s) URLs, public hosts only.
    """

    allow_remote: bool = False
    allow_local_files: bool = False
    allowed_image_dir: str | None = None
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    timeout: float = 10.0

    def load(self, url: str):
        """Bytes of the image at ``url`` checked against the limits, decoded to an RGB PIL image."""
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
            raise ImageTooLargeError(f"the image has too many pixels (over {self.max_pixels:,}); downscale it") from None
        except Exception:
            w = h = 0  # not an image: load_image below says so precisely
        if w * h > self.max_pixels:
            raise ImageTooLargeError(f"the image is {w}x{h} = {w * h:,} pixels, over the limit of "
                                     f"{self.max_pixels:,}; downscale it first")
        return load_image(data, max_pixels=self.max_pixels, max_bytes=self.max_bytes)

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


# --- scheduling --------------------------------------------------------------------------------------

class Job:
    """One request inside a scheduler. ``deliver(kind, value)`` is called from the worker thread with
    ("event", api.Event) or ("error", exception); the last call is a finished event or an error."""

    def __init__(self, request: schemas.ChatRequest, messages: list[dict], images: dict, deliver: Callable):
        self.request = request
        self.messages = messages
        self.images = images
        self.deliver = deliver
        self._cancelled = threading.Event()
        self.done = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Scheduler:
    """``n_slots`` KV caches of one model and a worker thread advancing active jobs one token each, in turn."""

    def __init__(self, pm, n_slots: int = DEFAULT_SLOTS, name: str = "model",
                 max_waiting: int = DEFAULT_MAX_WAITING):
        if not isinstance(n_slots, int) or n_slots < 1:
            raise RequestError(f"slots must be an integer >= 1 (got {n_slots!r})")
        self.pm = pm
        self.name = name
        self.n_slots = n_slots
        self.max_waiting = max_waiting
        self._free = [pm.new_slot() for _ in range(n_slots)]
        self._waiting: deque[Job] = deque()
        self._active: list[tuple[Job, Any, Any]] = []  # (job, slot, event generator)
        self._cv = threading.Condition()
        self._closed = False
        self.steps = 0  # tokens produced, all jobs together (observable for tests)
        self._thread = threading.Thread(target=self._loop, name=f"pocketvlm-scheduler-{name}", daemon=True)
        self._thread.start()

    # public -------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._waiting) >= self.max_waiting:
                raise ServerBusyError(f"{len(self._waiting)} requests are already waiting for model {self.name!r}; "
                                      "retry later")
            self._waiting.append(job)
            self._cv.notify()
        return job

    def stats(self) -> dict:
        with self._cv:
            return {"slots": self.n_slots, "active": len(self._active), "waiting": len(self._waiting),
                    "free_slots": len(self._free)}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # worker -------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._active:
                    self._cv.wait()
                if self._closed:
                    pending = list(self._waiting) + [j for j, _, _ in self._active]
                    self._waiting.clear()
                    break
                admit = []
                while self._waiting and len(self._free) > len(admit):
                    job = self._waiting.popleft()
                    if job.cancelled:
                        job.done.set()
                    else:
                        admit.append(job)
            for job in admit:
                self._start(job)
            for entry in list(self._active):
                self._step(entry)
        for job in pending:
            self._finish_error(job, RuntimeError("the engine was closed"))
        for job, _slot, gen in self._active:
            gen.close()

    def _start(self, job: Job) -> None:
        try:
            prompt = build_prompt(self.pm, job.messages, job.images)
            with self._cv:
                # the free slot whose cache shares the longest prefix with this prompt (multi-turn reuse)
                slot = max(self._free, key=lambda s: _common_prefix(s.keys, prompt.keys))
                self._free.remove(slot)
            r = job.request
            gen = self.pm.run(prompt, max_tokens=r.max_tokens or self.pm.context_window_size, stop=r.stop,
                              slot=slot, **r.sampling())
            self._active.append((job, slot, gen))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller
            self._finish_error(job, e)

    def _step(self, entry) -> None:
        job, slot, gen = entry
        if job.cancelled:
            gen.close()
            self._release(entry)
            return
        try:
            ev = next(gen)
        except StopIteration:
            self._release(entry)
            self._finish_error(job, RuntimeError("generation ended without a finish reason"))
            return
        except BaseException as e:  # noqa: BLE001
            slot.reset()  # a failure mid-prefill may leave the cache out of step with slot.keys
            self._release(entry)
            self._finish_error(job, e)
            return
        self.steps += 1
        if ev.finish_reason:
            self._release(entry)
        try:
            job.deliver("event", ev)
        except Exception:  # the receiver is gone (closed event loop): stop generating for it
            job.cancel()
        if ev.finish_reason:
            job.done.set()

    def _release(self, entry) -> None:
        job, slot, _gen = entry
        self._active.remove(entry)
        with self._cv:
            self._free.append(slot)
        if job.cancelled:
            job.done.set()

    @staticmethod
    def _finish_error(job: Job, e: BaseException) -> None:
        try:
            job.deliver("error", e)
        except Exception:
            pass
        job.done.set()


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def build_prompt(pm, messages: list[dict], images: dict | None = None):
    """The engine prompt for ``messages``, built by ``PocketModel.chat_prompt`` (so the server renders and
    tokenizes exactly as the Python API does). ``prepare`` has already replaced every image URL by the
    checked, decoded PIL image (an ``{"type": "image", "image": PIL}`` part), so nothing is fetched here."""
    return pm.chat_prompt(messages)


# --- the engine --------------------------------------------------------------------------------------

def model_id_for(source) -> str:
    s = str(source)
    p = Path(s).expanduser()
    if p.exists():
        return p.stem if p.is_file() else p.resolve().name
    return s


class Engine:
    """Serve one or more models in-process with OpenAI-shaped results.

    ``models``: ``{id: source or PocketModel}``, a list of sources (ids from their names), or a single
    source / PocketModel. Sources are loaded with ``pocketvlm.load(source, **load_kwargs)``.
    ``slots``: concurrent generations per model. Image options: see :class:`ImagePolicy`; in-process use
    allows local paths by default, the server only inside ``allowed_image_dir``.
    """

    def __init__(self, models=None, *, slots: int = DEFAULT_SLOTS, max_waiting: int = DEFAULT_MAX_WAITING,
                 load_kwargs: dict | None = None,
                 allow_remote_images: bool = False, allow_local_images: bool = True,
                 allowed_image_dir: str | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, image_timeout: float = 10.0):
        from ..api import PocketModel

        if models is None:
            from ..real_models import DEFAULT_MODEL

            models = [DEFAULT_MODEL]
        if isinstance(models, (str, Path, PocketModel)):
            models = [models]
        if not isinstance(models, dict):
            models = {(model_id_for(m.loaded.source) if isinstance(m, PocketModel) else model_id_for(m)): m
                      for m in models}
        if not models:
            raise RequestError("Engine needs at least one model")
        self.image_policy = ImagePolicy(allow_remote=allow_remote_images, allow_local_files=allow_local_images,
                                        allowed_image_dir=str(allowed_image_dir) if allowed_image_dir else None,
                                        max_pixels=max_image_pixels, max_bytes=max_image_bytes,
                                        timeout=image_timeout)
        self.created = int(time.time())
        self.pocket_models: dict[str, PocketModel] = {}
        self.schedulers: dict[str, Scheduler] = {}
        for mid, src in models.items():
            pm = src if isinstance(src, PocketModel) else _load(src, load_kwargs or {})
            self.pocket_models[mid] = pm
            self.schedulers[mid] = Scheduler(pm, slots, name=mid, max_waiting=max_waiting)
        self.chat = _Chat(self)
        self.models = _Models(self)

    # --- shared with the server ------------------------------------------------------------------------
    @property
    def model_ids(self) -> list[str]:
        return list(self.pocket_models)

    def resolve_model(self, model: str | None) -> str:
        if model is None or model == "":
            if len(self.pocket_models) == 1:
                return next(iter(self.pocket_models))
            raise RequestError(f"'model' is required; available: {', '.join(self.pocket_models)}")
        if model not in self.pocket_models:
            raise ModelNotFoundError(f"model {model!r} is not served here; available: {', '.join(self.pocket_models)}")
        return model

    def prepare(self, req: schemas.ChatRequest) -> tuple[str, list[dict], dict]:
        """Look up the model and load the request's images (blocking I/O: call it off the event loop).
        Returns (model id, messages with each image URL replaced by its PIL image, {index: PIL image})."""
        mid = self.resolve_model(req.model)
        pm = self.pocket_models[mid]
        images, messages, k = {}, [], 0
        for m in req.messages:
            if isinstance(m["content"], list):
                parts = []
                for p in m["content"]:
                    if p["type"] == "image_url":
                        img = self.image_policy.load(p["image_url"]["url"])
                        images[k] = img
                        parts.append({"type": "image", "image": img})
                        k += 1
                    else:
                        parts.append(p)
                m = {"role": m["role"], "content": parts}
            messages.append(m)
        # checked after loading so that a forbidden or oversize image is reported as such whatever the model
        if images and not pm.is_vlm:
            raise ImageError(f"model {mid!r} is text-only ({pm.architecture}) and cannot take images; "
                             "send text only or use a vision-language model")
        return mid, messages, images

    def submit(self, req: schemas.ChatRequest, prepared, deliver: Callable) -> Job:
        mid, messages, images = prepared
        return self.schedulers[mid].submit(Job(req, messages, images, deliver))

    def close(self) -> None:
        for s in self.schedulers.values():
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- in-process API --------------------------------------------------------------------------------
    def _create(self, *, model=None, messages=None, stream=False, **params):
        body = dict(params, model=model, messages=messages, stream=stream)
        req = schemas.parse_chat_request(body)
        prepared = self.prepare(req)
        q: queue.Queue = queue.Queue()
        job = self.submit(req, prepared, lambda kind, value: q.put((kind, value)))
        if req.stream:
            first = q.get()  # errors found at prefill (prompt too long, ...) raise here, like the openai client
            if first[0] == "error":
                raise first[1]
            return _stream_chunks(job, q, first, prepared[0], req.include_usage)
        parts = []
        try:
            while True:
                kind, value = q.get()
                if kind == "error":
                    raise value
                parts.append(value.text)
                if value.finish_reason:
                    return schemas.completion(schemas.new_id(), prepared[0], "".join(parts), value.finish_reason,
                                              value.prompt_tokens, value.completion_tokens)
        finally:
            job.cancel()  # no-op when finished; stops the generation if the caller was interrupted


def _load(source, load_kwargs: dict):
    from ..api import load

    return load(source, **load_kwargs)


def _stream_chunks(job: Job, q: queue.Queue, item, model: str, include_usage: bool):
    cid, created = schemas.new_id(), int(time.time())
    try:
        first = True
        while True:
            kind, value = item if first else q.get()
            if kind == "error":
                raise value
            if first:
                yield schemas.chunk(cid, model, created, {"role": "assistant", "content": ""},
                                    include_usage=include_usage)
                first = False
            if value.text:
                yield schemas.chunk(cid, model, created, {"content": value.text}, include_usage=include_usage)
            if value.finish_reason:
                yield schemas.chunk(cid, model, created, {}, value.finish_reason, include_usage=include_usage)
                if include_usage:
                    yield schemas.chunk(cid, model, created, None,
                                        usage_=schemas.usage(value.prompt_tokens, value.completion_tokens),
                                        include_usage=True)
                return
    finally:
        job.cancel()


class _Completions:
    def __init__(self, engine: Engine):
        self._engine = engine

    def create(self, *, model: str | None = None, messages=None, stream: bool = False, **params):
        """Like ``openai.OpenAI().chat.completions.create``: a ChatCompletion, or with ``stream=True`` an
        iterator of ChatCompletionChunk (closing it early stops the generation). Raises pocketvlm errors."""
        return self._engine._create(model=model, messages=messages, stream=stream, **params)


class _Chat:
    def __init__(self, engine: Engine):
        self.completions = _Completions(engine)


class _Models:
    def __init__(self, engine: Engine):
        self._engine = engine

    def list(self) -> schemas.OpenAIObject:
        e = self._engine
        return schemas.OpenAIObject(schemas.model_list([(m, {}) for m in e.model_ids], e.created))


__all__ = ["Engine", "Scheduler", "Job", "ImagePolicy", "check_public_url", "PocketVLMError"]
