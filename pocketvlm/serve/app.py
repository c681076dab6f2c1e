"""OpenAI-compatible HTTP server (FastAPI + uvicorn) and the web chat page.

    pocketvlm serve MODEL [MODEL...] [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...

Endpoints: ``POST /v1/chat/completions`` (streaming with Server-Sent Events), ``GET /v1/models``,
``GET /health``, and the chat page at ``/``. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``. Generation runs in the :class:`~.engine.Engine`'s
scheduler threads, so the event loop only moves bytes.

Safe defaults: binds 127.0.0.1; remote image URLs are refused unless ``--allow-remote-images`` (then public
http(s) hosts only); local image paths are refused unless inside ``--allowed-image-dir``; request bodies and
decoded image sizes are capped. fastapi/uvicorn are imported only when the server is built, so the CLI stays
quick for the other commands.
"""
import asyncio
import hmac
import json
import logging
import sys
import threading
import time
from pathlib import Path

from ..errors import (ContextWindowError, ImageError, ImageTooLargeError, ModelNotFoundError, PocketVLMError,
                      RequestError, SamplingError, ServerBusyError)
from . import schemas
from .connections import (DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
                          RETRY_AFTER_S, ConnectionLimits)
from .engine import (DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGES, DEFAULT_MAX_WAITING,
                     DEFAULT_SLOTS, Engine, model_id_for)

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
STATIC_DIR = Path(__file__).with_name("static")
log = logging.getLogger("pocketvlm.serve")


def error_response_for(e: BaseException) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) for an exception raised while handling a request."""
    param = getattr(e, "param", None)
    msg = str(e) or type(e).__name__
    if isinstance(e, ImageTooLargeError):
        return 413, schemas.error_body(msg, param=param, code="image_too_large")
    if isinstance(e, ServerBusyError):
        return 503, schemas.error_body(msg, "server_error", code="server_busy")
    if isinstance(e, ModelNotFoundError):
        return 404, schemas.error_body(msg, param="model", code="model_not_found")
    if isinstance(e, ContextWindowError):
        return 400, schemas.error_body(msg, param=param or "messages", code="context_length_exceeded")
    if isinstance(e, ImageError):
        return 400, schemas.error_body(msg, param=param or "messages", code="invalid_image")
    if isinstance(e, (RequestError, SamplingError)):
        return 400, schemas.error_body(msg, param=param, code="invalid_value" if isinstance(e, SamplingError) else None)
    if isinstance(e, PocketVLMError):
        return 400, schemas.error_body(msg, param=param)
    log.error("internal error while handling a request", exc_info=e)   # the traceback stays server-side
    return 500, schemas.error_body(f"internal error ({type(e).__name__}); see the server log", "server_error")


def error_json(e: BaseException):
    """The JSONResponse for an exception: OpenAI's error body, ``Retry-After`` on 503."""
    from fastapi.responses import JSONResponse

    status, body = error_response_for(e)
    return JSONResponse(body, status_code=status, headers={"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None)


class ClientGone(Exception):
    """The client closed the connection while its answer was being generated."""


def _sse(obj) -> bytes:
    data = obj.model_dump() if isinstance(obj, schemas.OpenAIObject) else obj
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1"]


def create_app(engine: Engine, *, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               allowed_hosts: list[str] | None = None, allowed_origins: list[str] | None = None):
    """The FastAPI application serving ``engine``. ``allowed_hosts``: accepted ``Host`` header names (None:
    any); a server on loopback should accept only loopback names, so that a web page whose domain is
    rebound to 127.0.0.1 cannot use the models through the visitor's browser."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.staticfiles import StaticFiles

    app = FastAPI(title="pocketvlm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    def err(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None, headers=None):
        return JSONResponse(schemas.error_body(message, type_, param, code), status_code=status, headers=headers)

    def auth_error(request: Request):
        if not api_key:
            return None
        header = request.headers.get("authorization", "")
        if key_ok(header, api_key):
            return None
        what = "no API key was given" if not header else "the API key is not valid"
        return err(401, f"{what}: send 'Authorization: Bearer <key>' with the key the server was started with",
                   code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return err(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return err(400, f"invalid request: {exc.errors()}")

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": engine.model_ids,
                "schedulers": {m: s.stats() for m, s in engine.schedulers.items()}}

    @app.get("/v1/models")
    async def list_models(request: Request):
        if (e := auth_error(request)) is not None:
            return e
        return schemas.model_list([(m, {"vision": pm.is_vlm, "context_window": pm.context_window_size,
                                        **assistant_facts(pm)})
                                   for m, pm in engine.pocket_models.items()], engine.created)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        if (e := auth_error(request)) is not None:
            return e
        if model_id not in engine.pocket_models:
            return err(404, f"model {model_id!r} is not served here", param="model", code="model_not_found")
        pm = engine.pocket_models[model_id]
        return {"id": model_id, "object": "model", "created": engine.created, "owned_by": "pocketvlm",
                "vision": pm.is_vlm, "context_window": pm.context_window_size}

    async def next_item(q: asyncio.Queue, request: Request, job, checked: list):
        """The next (kind, value) from the worker. At most every 0.5 s (also while tokens keep coming) it looks
        whether the client went away, and then cancels the job. ``checked`` holds the last check's time."""
        while True:
            if time.monotonic() - checked[0] > 0.5:
                checked[0] = time.monotonic()
                if await request.is_disconnected():
                    job.cancel()
                    raise ClientGone()
            try:
                return await asyncio.wait_for(q.get(), timeout=0.5)
            except asyncio.TimeoutError:
                continue

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if (e := auth_error(request)) is not None:
            return e
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as ex:
            return err(400, f"the request body is not valid JSON ({ex})", code="invalid_json")
        job = None
        try:
            req = schemas.parse_chat_request(body)
            prepared = list(await run_in_threadpool(engine.prepare, req))  # image fetch/decode: off the loop
            model = prepared[0]
            loop = asyncio.get_running_loop()
            q: asyncio.Queue = asyncio.Queue()

            def deliver(kind, value):
                loop.call_soon_threadsafe(q.put_nowait, (kind, value))

            job = engine.submit(req, prepared, deliver)  # (empties prepared: the job holds the images)
            checked = [time.monotonic()]
            kind, value = await next_item(q, request, job, checked)  # prefill errors get a proper status code
            if kind == "error":
                raise value
        except BaseException as ex:
            if job is not None:
                job.cancel()
            if isinstance(ex, ClientGone):
                return Response(status_code=499)  # nobody reads it; the status is for access logs
            if isinstance(ex, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise
            return error_json(ex)

        if not req.stream:
            parts = [value.text]
            try:
                while not value.finish_reason:
                    try:
                        kind, value = await next_item(q, request, job, checked)
                    except ClientGone:
                        return Response(status_code=499)
                    if kind == "error":
                        return error_json(value)
                    parts.append(value.text)
            finally:
                job.cancel()
            return schemas.completion(schemas.new_id(), model, "".join(parts), value.finish_reason,
                                      value.prompt_tokens, value.completion_tokens, extra=job.extra).model_dump()

        async def events(value=value):
            cid, created, usage = schemas.new_id(), int(time.time()), req.include_usage
            try:
                yield _sse(schemas.chunk(cid, model, created, {"role": "assistant", "content": ""},
                                         include_usage=usage, extra=job.extra))
                while True:
                    if value.text:
                        yield _sse(schemas.chunk(cid, model, created, {"content": value.text}, include_usage=usage))
                    if value.finish_reason:
                        yield _sse(schemas.chunk(cid, model, created, {}, value.finish_reason, include_usage=usage))
                        if usage:
                            yield _sse(schemas.chunk(cid, model, created, None, include_usage=True,
                                                     usage_=schemas.usage(value.prompt_tokens,
                                                                          value.completion_tokens)))
                        yield b"data: [DONE]\n\n"
                        return
                    kind, value = await q.get()  # a client that leaves cancels this task: see finally
                    if kind == "error":
                        yield _sse(error_response_for(value)[1])
                        return
            finally:
                job.cancel()  # frees the slot at the worker's next turn if the answer was not finished

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/")
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return Guard(app, max_body_bytes, allowed_hosts, api_key=api_key, allowed_origins=allowed_origins)


def assistant_facts(pm) -> dict:
    """For an assistant model, which VLM looks and which chat model answers (the web chat names them)."""
    if getattr(pm, "architecture", None) != "assistant":
        return {}
    c = pm.config
    return {"assistant": {"vision": c.vision, "chat": c.chat, "memory": c.memory}}


def _host_name(host: str) -> str:
    """The name part of a Host header: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:8000" -> "::1"."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def key_ok(authorization: str, api_key: str) -> bool:
    """Whether an ``Authorization`` header value carries ``Bearer <api_key>`` (compared in constant time)."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def _origin_ok(origin: str, host: str, allowed_origins: set[str]) -> bool:
    """A browser's ``Origin`` is this server itself (the chat page: same scheme-less host:port as the ``Host``
    header) or one of ``allowed_origins``; ``null`` (sandboxed frames, files) never is."""
    o = origin.strip().lower().rstrip("/")
    if o in allowed_origins:
        return True
    scheme, sep, netloc = o.partition("://")
    return bool(sep) and scheme in ("http", "https") and netloc == host


class Guard:
    """ASGI middleware run before the application reads anything, in this order:

    - a ``Host`` not in ``allowed_hosts``: 400 (DNS rebinding);
    - a state-changing request (not GET/HEAD/OPTIONS) from a browser page of another site (an ``Origin`` that
      is neither this server nor in ``allowed_origins``): 403. Browsers send ``no-cors`` POSTs cross-site
      without asking; their ``Origin`` header says whose page sent it;
    - a POST without ``Content-Type: application/json``: 415 (forms and text/plain are what browsers send
      cross-site without a preflight);
    - with ``api_key``, a ``/v1/`` request without the key: 401, before the body is read;
    - a body over ``limit`` bytes: 413 (by Content-Length, or counted while reading)."""

    def __init__(self, app, limit: int, allowed_hosts: list[str] | None = None, *, api_key: str | None = None,
                 allowed_origins: list[str] | None = None):
        self.app = app
        self.limit = int(limit)
        self.allowed_hosts = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}
        self.api_key = api_key
        self.allowed_origins = {o.strip().lower().rstrip("/") for o in allowed_origins or []}

    def __getattr__(self, name):  # expose the wrapped FastAPI app's attributes (state, routes, ...)
        return getattr(self.app, name)

    async def _reply(self, send, status: int, message: str, code: str, extra: list | None = None) -> None:
        body = json.dumps(schemas.error_body(message, code=code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"), *(extra or [])]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.allowed_hosts is not None:
            host = headers.get("host", "").strip().lower()
            if _host_name(host) not in self.allowed_hosts:
                return await self._reply(send, 400, f"Host {host!r} is not served here (allowed: "
                                         f"{', '.join(sorted(self.allowed_hosts))}; see --allowed-host)", "invalid_host")
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        origin = headers.get("origin")
        if origin is not None and not _origin_ok(origin, headers.get("host", "").strip().lower(), self.allowed_origins):
            return await self._reply(send, 403, f"requests from the web page of {origin!r} are not accepted here "
                                     "(another site); start the server with --allowed-origin for a web front end",
                                     "cross_origin")
        ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json" and not ctype.endswith("+json"):
            return await self._reply(send, 415, f"Content-Type {ctype or '(none)'!r} is not accepted; send JSON with "
                                     "'Content-Type: application/json'", "unsupported_media_type")
        if self.api_key and scope.get("path", "").startswith("/v1/"):
            if not key_ok(headers.get("authorization", ""), self.api_key):
                return await self._reply(send, 401, "no valid API key: send 'Authorization: Bearer <key>' with the "
                                         "key the server was started with", "invalid_api_key",
                                         [(b"www-authenticate", b"Bearer")])
        too_big = f"the request body is over the limit of {self.limit:,} bytes (--max-body-bytes); send smaller images"
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    return await self._reply(send, 400, "invalid Content-Length header", "invalid_request")
                if n > self.limit:
                    return await self._reply(send, 413, too_big, "request_too_large")
        chunks, total = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            total += len(chunk)
            if total > self.limit:
                return await self._reply(send, 413, too_big, "request_too_large")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later reads see the client's disconnect

        await self.app(scope, replay, send)


# --- running ------------------------------------------------------------------------------------------

class ServerThread:
    """Run an app under uvicorn in a background thread (tests, notebooks): ``with ServerThread(app) as s:``
    then use ``s.url``. ``port=0`` picks a free port. ``limits``: the connection limits, as ``pocketvlm
    serve`` applies them (default: its defaults)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 limits: ConnectionLimits | None = None):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self.limits = limits or ConnectionLimits()
        self.server = uvicorn.Server(self.limits.uvicorn_config(app, host=host, port=port, log_level=log_level,
                                                                timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="pocketvlm-uvicorn", daemon=True)

    def start(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


SERVE_PREFILL_CHUNK_SIZE = 256


def register_cli(sub) -> None:
    from ..cli import add_model_options
    from ..real_models import DEFAULT_MODEL

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page")
    p.add_argument("model", nargs="*", default=None,
                   help=f"models to serve: HF folders or repo ids, .gguf files, package folders, built-in names "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--model-id", action="append", default=None,
                   help="name clients use for each model, in order (default: the folder or file name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 endpoints (default: $POCKETVLM_API_KEY if set)")
    p.add_argument("--allowed-host", action="append", default=None,
                   help="Host header names to accept (repeatable). Default: on a loopback --host only 127.0.0.1, "
                        "localhost and ::1 (DNS-rebinding guard); on other addresses any")
    p.add_argument("--allowed-origin", action="append", default=None,
                   help="a web front end on another origin allowed to POST here, e.g. https://chat.example.org "
                        "(repeatable). Default: only this server's own chat page; other sites' pages get 403")
    p.add_argument("--allowed-image-dir", default=None, help="allow local image paths, only inside this folder")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (public hosts only; never loopback or private addresses)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS)
    p.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES)
    p.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES, help="images per request")
    p.add_argument("--max-request-pixels", type=int, default=None,
                   help="decoded pixels of all a request's images together (default: 2 x --max-image-pixels)")
    p.add_argument("--slots", type=int, default=DEFAULT_SLOTS, help="concurrent generations per model")
    p.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                   help="requests that may queue per model behind busy slots; more are answered 503")
    p.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT,
                   help="seconds a client may take to send a request's line and headers, from connecting or from "
                        "the previous answer (default %(default)g); then 408 and the connection is closed")
    p.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT,
                   help="seconds a client may take to send a request's body after its headers, plus 1 s per 64 KiB "
                        "received (default %(default)g); then 408 and the connection is closed")
    p.add_argument("--max-connections-per-client", type=int, default=DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
                   help="open connections one client address may hold (an IPv6 /64 counts as one address); more "
                        "are answered 503 with Retry-After and closed. 0: no cap (behind a reverse proxy, where all "
                        "clients share its address: let the proxy limit them). Default %(default)d")
    p.add_argument("--log-level", default="info")
    add_model_options(p)
    # a long prompt is read one prefill chunk per scheduler turn between the other streams' tokens: at 512 tokens
    # one chunk held a running stream for 1.15 s on a 2-core CPU, at 256 for 0.76 s (benchmarks/stall.py)
    p.set_defaults(fn=cmd_serve, prefill_chunk_size=SERVE_PREFILL_CHUNK_SIZE)


def cmd_serve(a) -> int:
    import argparse
    import os

    from ..cli import load_model
    from ..real_models import DEFAULT_MODEL

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise RequestError("the server needs fastapi and uvicorn: pip install 'pocketvlm[serve]'") from None
    sources = a.model or [DEFAULT_MODEL]
    ids = a.model_id or []
    if len(ids) > len(sources):
        raise RequestError(f"{len(ids)} --model-id values for {len(sources)} model(s)")
    ids = ids + [model_id_for(s) for s in sources[len(ids):]]
    if len(set(ids)) != len(ids):
        raise RequestError(f"two models share an id ({', '.join(ids)}); name them with --model-id")
    if a.slots < 1 or a.max_waiting < 0 or min(a.max_body_bytes, a.max_image_pixels, a.max_image_bytes,
                                                a.max_images, a.max_request_pixels or 1) < 1:
        raise RequestError("--slots and the --max-* limits must be >= 1")
    if a.allowed_image_dir and not Path(a.allowed_image_dir).is_dir():
        raise RequestError(f"--allowed-image-dir {a.allowed_image_dir!r} is not a folder")
    limits = ConnectionLimits(a.header_timeout, a.body_timeout, a.max_connections_per_client)
    api_key = a.api_key or os.environ.get("POCKETVLM_API_KEY") or None
    models = {}
    for mid, src in zip(ids, sources):
        print(f"loading {src} as {mid!r} ...", file=sys.stderr, flush=True)
        models[mid] = load_model(argparse.Namespace(**{**vars(a), "model": src}))  # same options as `chat`
    engine = Engine(models, slots=a.slots, max_waiting=a.max_waiting, allow_remote_images=a.allow_remote_images,
                    allow_local_images=False,
                    allowed_image_dir=a.allowed_image_dir, max_image_pixels=a.max_image_pixels,
                    max_image_bytes=a.max_image_bytes, max_images=a.max_images,
                    max_request_pixels=a.max_request_pixels)
    allowed_hosts = a.allowed_host
    if allowed_hosts is None and a.host in LOOPBACK_NAMES:
        allowed_hosts = LOOPBACK_NAMES
    elif allowed_hosts is not None:
        allowed_hosts = allowed_hosts + LOOPBACK_NAMES
    app = create_app(engine, api_key=api_key, max_body_bytes=a.max_body_bytes, allowed_hosts=allowed_hosts,
                     allowed_origins=a.allowed_origin)
    if a.host not in LOOPBACK_NAMES and not api_key:
        print(f"warning: listening on {a.host} without --api-key: anyone who can reach this address can use "
              "the models", file=sys.stderr)
    print(f"pocketvlm: serving {', '.join(ids)} at http://{a.host}:{a.port} (web chat at /, API at /v1)",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(limits.uvicorn_config(app, host=a.host, port=a.port, log_level=a.log_level))
    try:
        server.run()
    finally:
        engine.close()
    return 0 if server.started else 1
