"""Batch jobs: answer one prompt per image for every row of an input, locally or on Ray Data.

:class:`Answerer` turns rows into output rows with one loaded model; it is the whole of the model work, and
both runners use it, so a local run and a Ray run give the same greedy answers. Per batch of rows it

1. decodes each image (``prepare``; the local runner does it in a background thread, ahead of the model),
2. runs the images that are not cached yet through the vision tower in one batch
   (:func:`pocketvlm.prompts.encode_images`; each image's features depend on that image only),
3. answers each row as a fresh one-message chat, greedy (the slot is reset first, so an answer never depends
   on the rows before it or on how rows were grouped into batches).

A row whose image cannot be read, fetched or used becomes a row with ``error`` and the job goes on.
Output rows: ``id``, ``image``, ``prompt``, ``answer`` and the timings ``image_ms`` (read + decode),
``encode_ms`` (this row's share of the batched vision tower), ``generate_ms`` (prompt + answer tokens) and
``total_ms``; or ``id``, ``image``, ``prompt``, ``error``.

:func:`run` is the job: read the input, check the output's identity, skip the rows already done, then run
locally (:func:`run_local`) or on Ray (:mod:`pocketvlm.batch.ray_runner`).
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError, PocketVLMError
from .inputs import read_rows, unique_ids
from .output import check_job, dumps, merge_shards, read_done, skip_done
from .pipeline import batched, prefetch

CAPTION_PROMPT = "Describe the image briefly."
OUTPUT_FIELDS = ("id", "image", "prompt", "answer", "error", "image_ms", "encode_ms", "generate_ms", "total_ms")
_REMOTE = re.compile(r"^https?://", re.I)


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


class Answerer:
    """Answers rows with one model. ``model``: a loaded :class:`~pocketvlm.api.PocketModel`, or None to load one
    from ``load`` (the keyword arguments of :func:`pocketvlm.load`: how each Ray actor gets its own copy).
    Called with a batch of columns (Ray Data's ``map_batches``), it returns the output rows' columns.
    ``threads``: torch's threads in this process (None: as they are). The thread count splits the sums inside
    the matrix products differently, so two runs give the same greedy answers when their model copies run
    the same number of threads (a near tie can flip otherwise: 2 of 100 answers on pocketvlm-scenes)."""

    def __init__(self, model=None, *, load: dict | None = None, max_tokens: int = 64,
                 allow_remote_images: bool = False, batch_size: int = 8, threads: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        if model is None:
            from ..api import load as load_model

            model = load_model(**(load or {}))
        if not model.is_vlm:
            raise ImageError(f"{model.architecture} is a text-only model: a batch job asks about images "
                             "(load a vision-language model)")
        from ..serve.images import ImagePolicy

        self.model = model
        self.max_tokens = max_tokens
        self.allow_remote = allow_remote_images
        # Local paths allowed (the job's own input); URLs only when asked, public hosts only.
        self.policy = ImagePolicy(allow_remote=allow_remote_images, allow_local_files=True,
                                  max_pixels=64_000_000, max_bytes=64 * 1024 * 1024)
        model._image_cache_size = max(model._image_cache_size, batch_size)  # a batch's features stay cached

    def prepare(self, row: dict) -> dict:
        """The row with its decoded image (``_img``) and ``image_ms``, or with ``error``."""
        row = {k: v for k, v in row.items() if v is not None}
        if "error" in row:
            return row
        t0 = time.perf_counter()
        try:
            if row.get("data") is not None:
                from ..image import load_image

                row["_img"] = load_image(bytes(row["data"]), max_pixels=self.policy.max_pixels)
            elif _REMOTE.match(row["image"]) and not self.allow_remote:
                raise ImageError("remote image URLs are off; pass --allow-remote-images "
                                 "(allow_remote_images=True) to fetch them (public hosts only)")
            else:
                row["_img"] = self.policy.load(row["image"])
        except (PocketVLMError, OSError, ValueError) as e:
            row["error"] = f"{type(e).__name__}: {e}"
        row["image_ms"] = _ms(time.perf_counter() - t0)
        return row

    def answer(self, rows: list[dict]) -> list[dict]:
        """Output rows for prepared rows (see the module docstring)."""
        from ..prompts import encode_images

        ok = [r for r in rows if "_img" in r]
        encode_ms = 0.0
        if ok:
            t0 = time.perf_counter()
            try:
                encode_images(self.model, [r["_img"] for r in ok])
            except PocketVLMError:
                pass  # one image the tower cannot take: each row below meets its own error alone
            encode_ms = _ms((time.perf_counter() - t0) / len(ok))
        return [self._one(r, encode_ms) for r in rows]

    def _one(self, row: dict, encode_ms: float) -> dict:
        img = row.pop("_img", None)
        out = {"id": row["id"], "image": row.get("image"), "prompt": row.get("prompt")}
        if img is None:
            return {**out, "error": row["error"]}
        t0 = time.perf_counter()
        try:
            self.model.reset()  # a fresh conversation: the answer depends on this row only
            content = [{"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": row["prompt"]}]
            answer = self.model.chat([{"role": "user", "content": content}], temperature=0,
                                     max_tokens=self.max_tokens)
        except PocketVLMError as e:
            return {**out, "error": f"{type(e).__name__}: {e}"}
        gen = time.perf_counter() - t0
        return {**out, "answer": answer, "image_ms": row["image_ms"], "encode_ms": encode_ms,
                "generate_ms": _ms(gen), "total_ms": round(row["image_ms"] + encode_ms + _ms(gen), 2)}

    def __call__(self, batch: dict) -> dict:
        """Ray Data's entry: a batch of columns in, the output rows' columns out."""
        keys = list(batch)
        rows = [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]
        out = self.answer([self.prepare(_plain(r)) for r in rows])
        return {k: [r.get(k) for r in out] for k in OUTPUT_FIELDS}


def _plain(row: dict) -> dict:
    """A row from Ray's columns back to Python values (numpy scalars and NaN become str / None)."""
    out = {}
    for k, v in row.items():
        if hasattr(v, "item") and not isinstance(v, (bytes, bytearray)):
            v = v.item()
        if isinstance(v, float) and v != v:
            v = None
        out[k] = v
    return out


@dataclass
class Stats:
    total: int  # rows in the input
    skipped: int  # already in the output
    answered: int = 0
    errors: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return (self.answered + self.errors) / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (f"{self.answered} answered, {self.errors} error rows, {self.skipped} already done (of {self.total}) "
                f"in {self.seconds:.1f} s: {self.images_per_s:.2f} images/s")


def run_local(answerer: Answerer, rows: list[dict], out: Path, stats: Stats, *, batch_size: int = 8,
              progress: bool = True) -> Stats:
    """Answer ``rows`` into ``out`` (appending, one flushed line per row), images decoded ahead in a thread."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    with open(out, "a", encoding="utf-8") as f, tqdm(total=len(rows), unit="img", desc="batch",
                                                      disable=not progress) as bar:
        for group in batched(prefetch(rows, answerer.prepare, depth=2 * batch_size), batch_size):
            for row in answerer.answer(group):
                f.write(dumps(row))
                f.flush()
                stats.errors += "error" in row
                stats.answered += "error" not in row
                bar.update(1)
            stats.seconds = time.perf_counter() - t0
    return stats


def job_identity(task: str, prompt: str, load: dict, max_tokens: int) -> dict:
    """What makes two runs the same job (the sidecar ``OUT.jsonl.job.json``)."""
    from ..real_models import DEFAULT_MODEL

    load = {k: (str(v) if isinstance(v, Path) else v) for k, v in load.items()}
    load["source"] = str(load.get("source") or DEFAULT_MODEL)
    return {"kind": "pocketvlm-batch", "task": task, "prompt": prompt, "max_tokens": max_tokens, "model": load}


def run(input: str | Path, out: str | Path, *, task: str = "caption", prompt: str | None = None,
        load: dict | None = None, model=None, max_tokens: int = 64, batch_size: int = 8,
        allow_remote_images: bool = False, progress: bool = True, ray: bool = False, ray_address: str | None = None,
        actors: int = 1, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, threads: int | None = None,
        answerer_cls=Answerer) -> Stats:
    """Run a batch job (see the module docstring): ``task`` "caption" (``prompt`` defaults to
    :data:`CAPTION_PROMPT`) or "ask"; ``load``: :func:`pocketvlm.load`'s keyword arguments (``source`` = the
    model), or an already loaded ``model`` for a local run. ``ray``/``ray_address``: run on Ray Data with
    ``actors`` model copies. ``threads``: torch threads per model copy (default: torch's own locally, the
    whole ``cpus_per_actor`` on Ray). Returns the job's :class:`Stats`."""
    from ..errors import DataError

    if task not in ("caption", "ask"):
        raise DataError(f"unknown batch task {task!r}; use caption or ask")
    if task == "ask" and not prompt:
        raise DataError("batch ask needs --prompt (rows of a manifest may also carry their own prompt)")
    for name, v in (("max_tokens", max_tokens), ("batch_size", batch_size), ("actors", actors),
                    ("threads", threads or 1)):
        if v < 1:
            raise DataError(f"{name} must be at least 1 (got {v})")
    prompt = prompt or CAPTION_PROMPT
    load = dict(load or {})
    if model is not None:
        load.setdefault("source", str(model.loaded.source))
    out = Path(out).expanduser()
    use_ray = ray or ray_address is not None
    if use_ray:
        from .ray_runner import import_ray

        import_ray()  # a missing extra is said before anything else happens
    rows = list(unique_ids(read_rows(input, prompt)))  # a missing or unreadable input fails before any model work
    check_job(out, job_identity(task, prompt, load, max_tokens))
    read_done([out], repair=True)  # a torn last line is cut off before anything is appended
    merge_shards(out)  # rows an interrupted Ray run wrote
    done = read_done([out])
    todo = list(skip_done(rows, done))
    stats = Stats(total=len(rows), skipped=len(rows) - len(todo))
    if stats.skipped and progress:
        print(f"resuming {out}: {stats.skipped} of {len(rows)} rows already done", file=sys.stderr)
    if not todo:
        return stats
    kw = dict(max_tokens=max_tokens, allow_remote_images=allow_remote_images, batch_size=batch_size,
              threads=threads or (max(1, int(cpus_per_actor)) if use_ray else None))
    if use_ray:
        from .ray_runner import run_ray

        return run_ray(answerer_cls, dict(load=load, **kw), todo, out, stats, address=ray_address, actors=actors,
                       cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, batch_size=batch_size,
                       progress=progress)
    answerer = answerer_cls(model, load=load, **kw)
    return run_local(answerer, todo, out, stats, batch_size=batch_size, progress=progress)
