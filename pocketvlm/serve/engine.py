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

import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from ..engine.generate import decode_pending
from ..errors import ImageError, ModelNotFoundError, RequestError, ServerBusyError
from ..quant.hugepages import release_freed_heap
from . import schemas
from .images import (DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGES,  # noqa: F401
                     ImagePolicy, check_public_url, fetch_public_url)

DEFAULT_SLOTS = 4
DEFAULT_MAX_WAITING = 256  # queued requests per model beyond the busy slots; more get ServerBusyError (503)


# --- scheduling --------------------------------------------------------------------------------------

class Job:
    """One request inside a scheduler. ``deliver(kind, value)`` is called from the worker thread with
    ("event", api.Event) or ("error", exception); the last call is a finished event or an error."""

    def __init__(self, request: schemas.ChatRequest, messages: list[dict], images: dict, deliver: Callable,
                 prompt=None):
        self.request = request
        self.messages = messages
        self.images = images
        self.prompt = prompt  # built before submitting (a PocketModel's), else on the worker
        self.deliver = deliver
        self.extra = None  # set from the prompt before the first event: an assistant's descriptions
        self._cancelled = threading.Event()
        self.done = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Scheduler:
    """``n_slots`` KV caches of one model and a worker thread advancing active jobs one token each, in turn; the
    active jobs' next tokens are then decoded together in one fused step (``decode_pending``)."""

    def __init__(self, pm, n_slots: int = DEFAULT_SLOTS, name: str = "model",
                 max_waiting: int = DEFAULT_MAX_WAITING):
        if not isinstance(n_slots, int) or n_slots < 1:
            raise RequestError(f"slots must be an integer >= 1 (got {n_slots!r})")
        self.pm = pm
        self.name = name
        n_slots = min(n_slots, getattr(pm, "max_slots", n_slots))  # a sequential assistant runs one at a time
        self.n_slots = n_slots
        self.max_waiting = max_waiting
        self._free = [pm.new_slot() for _ in range(n_slots)]
        for slot in self._free:  # a greedy answer never depends on what ran in its slot before
            slot.exact_reuse = True
            slot.defer_decode = True  # the active slots decode together: one weight read per token for all
        self._waiting: deque[Job] = deque()
        self._active: list[tuple[Job, Any, Any]] = []  # (job, slot, event generator)
        self._cv = threading.Condition()
        self._closed = False
        self.steps = 0  # tokens produced, all jobs together (observable for tests)
        self.batched = 0  # decodes run in batches of several slots (observable for tests)
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
            self.batched += decode_pending([slot for _, slot, _ in self._active])
        for job in pending:
            self._finish_error(job, RuntimeError("the engine was closed"))
        for job, _slot, gen in self._active:
            gen.close()

    def _start(self, job: Job) -> None:
        try:
            prompt = job.prompt or build_prompt(self.pm, job.messages, job.images)
            job.prompt = None
            job.extra = prompt.extra
            if job.images:  # the decoded images are pixel tensors in the prompt now: give their memory back
                job.messages = job.images = None
                release_freed_heap()  # (glibc keeps a decoded photo's freed blocks in its heap)
            with self._cv:
                # the free slot whose cache shares the longest prefix with this prompt (multi-turn reuse)
                slot = max(self._free, key=lambda s: _common_prefix(s.keys, prompt.keys))
                self._free.remove(slot)
            r = job.request
            gen = self.pm.run(prompt, max_tokens=r.max_tokens or self.pm.context_window_size, stop=r.stop,
                              slot=slot, interleave=True, **r.sampling())
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
        if ev is None:  # one prefill chunk of a long prompt: the other requests' turn
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
    ``slots``: concurrent generations per model; ``max_waiting``: requests that may queue behind them (more
    raise ServerBusyError). Image options: see :class:`ImagePolicy`; in-process use
    allows local paths by default, the server only inside ``allowed_image_dir``.
    """

    def __init__(self, models=None, *, slots: int = DEFAULT_SLOTS, max_waiting: int = DEFAULT_MAX_WAITING,
                 load_kwargs: dict | None = None,
                 allow_remote_images: bool = False, allow_local_images: bool = True,
                 allowed_image_dir: str | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, image_timeout: float = 10.0,
                 max_images: int = DEFAULT_MAX_IMAGES, max_request_pixels: int | None = None):
        from ..api import PocketModel
        from ..assistant import Assistant

        if models is None:
            from ..real_models import DEFAULT_MODEL

            models = [DEFAULT_MODEL]
        if isinstance(models, (str, Path, PocketModel, Assistant)):
            models = [models]
        if not isinstance(models, dict):
            models = {(model_id_for(m.loaded.source) if isinstance(m, PocketModel)
                       else m.name if isinstance(m, Assistant) else model_id_for(m)): m for m in models}
        if not models:
            raise RequestError("Engine needs at least one model")
        self.image_policy = ImagePolicy(allow_remote=allow_remote_images, allow_local_files=allow_local_images,
                                        allowed_image_dir=str(allowed_image_dir) if allowed_image_dir else None,
                                        max_pixels=max_image_pixels, max_bytes=max_image_bytes,
                                        timeout=image_timeout, max_images=max_images,
                                        max_request_pixels=max_request_pixels)
        self.created = int(time.time())
        self.pocket_models: dict[str, PocketModel | Assistant] = {}
        self.schedulers: dict[str, Scheduler] = {}
        for mid, src in models.items():
            pm = src if isinstance(src, (PocketModel, Assistant)) else _load(src, load_kwargs or {})
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

    def prepare(self, req: schemas.ChatRequest) -> tuple:
        """Look up the model, load the request's images and build its prompt (blocking work: call it off the
        event loop; it runs beside the model's worker thread, which keeps decoding other requests). Returns
        (model id, None, None, engine prompt), or for an Assistant (model id, messages with each image URL
        replaced by its PIL image, {index: PIL image}, None): its prompt is built on the worker.
        Every image's source, size and header are checked, then the model's capability and the request's
        limits (count, pixels in all), all before the first pixel is decoded; then they decode one by one."""
        mid = self.resolve_model(req.model)
        pm = self.pocket_models[mid]
        urls = [p["image_url"]["url"] for m in req.messages if isinstance(m["content"], list)
                for p in m["content"] if p["type"] == "image_url"]
        if len(urls) > self.image_policy.max_images:  # before fetching or reading any of them
            self.image_policy.check_request([(b"", (0, 0))] * len(urls))
        probed = [self.image_policy.probe(u) for u in urls]
        # a forbidden or oversize image is reported as such whatever the model; then the model's capability
        if probed and not pm.is_vlm:
            raise ImageError(f"model {mid!r} is text-only ({pm.architecture}) and cannot take images; "
                             "send text only or use a vision-language model")
        self.image_policy.check_request(probed)
        from ..api import PocketModel

        if isinstance(pm, PocketModel):  # tokenized, its images encoded, here: off the model's worker thread
            # (an Assistant's prompt runs its VLM, which stays on the worker beside its chat model)
            prompt = build_prompt(pm, *self._decoded(req, probed))
            if probed:  # the decoded images are gone with _decoded's frame: give their memory back
                release_freed_heap()  # (glibc keeps a decoded photo's freed blocks in its heap)
            return mid, None, None, prompt
        return (mid, *self._decoded(req, probed), None)

    def _decoded(self, req: schemas.ChatRequest, probed: list) -> tuple[list[dict], dict]:
        """(messages with each image URL replaced by its decoded PIL image, {index: PIL image}), decoding the
        probed images one after the other."""
        images, messages, k = {}, [], 0
        for m in req.messages:
            if isinstance(m["content"], list):
                parts = []
                for p in m["content"]:
                    if p["type"] == "image_url":
                        img = self.image_policy.decode(probed[k])
                        probed[k] = None  # the encoded bytes are not needed any more
                        images[k] = img
                        parts.append({"type": "image", "image": img})
                        k += 1
                    else:
                        parts.append(p)
                m = {"role": m["role"], "content": parts}
            messages.append(m)
        return messages, images

    def submit(self, req: schemas.ChatRequest, prepared, deliver: Callable) -> Job:
        """Queue a prepared request. ``prepared`` is emptied: the job holds its images until its prompt is
        built, then drops them (callers keep the model id, ``prepared[0]``, before submitting)."""
        mid, messages, images, prompt = prepared
        if isinstance(prepared, list):
            prepared.clear()
        return self.schedulers[mid].submit(Job(req, messages, images, deliver, prompt))

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
        prepared = list(self.prepare(req))
        mid = prepared[0]
        q: queue.Queue = queue.Queue()
        job = self.submit(req, prepared, lambda kind, value: q.put((kind, value)))
        if req.stream:
            first = q.get()  # errors found at prefill (prompt too long, ...) raise here, like the openai client
            if first[0] == "error":
                raise first[1]
            return _stream_chunks(job, q, first, mid, req.include_usage)
        parts = []
        try:
            while True:
                kind, value = q.get()
                if kind == "error":
                    raise value
                parts.append(value.text)
                if value.finish_reason:
                    return schemas.completion(schemas.new_id(), mid, "".join(parts), value.finish_reason,
                                              value.prompt_tokens, value.completion_tokens, extra=job.extra)
        finally:
            job.cancel()  # no-op when finished; stops the generation if the caller was interrupted


def _load(source, load_kwargs: dict):
    from ..assistant import load_any

    return load_any(source, **load_kwargs)


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
                                    include_usage=include_usage, extra=job.extra)
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


__all__ = ["Engine", "Scheduler", "Job", "ImagePolicy", "check_public_url", "fetch_public_url"]
