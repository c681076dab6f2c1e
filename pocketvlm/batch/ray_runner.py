"""The Ray runner: the same rows and the same :class:`~pocketvlm.batch.runner.Answerer` on Ray Data.

* Ray Data holds the rows still to do (``from_items``: ids, image paths or URLs, prompts; the images are read
  by the actors, so they never pass through the driver) and ``map_batches`` runs them through an actor pool
  of ``actors`` Answerers, each holding one loaded model (``num_cpus`` / ``num_gpus`` per actor).
* An actor that dies (its process killed, its node lost) is restarted and the batches it held are run again
  (Ray Data's defaults for an actor pool: ``max_restarts=-1``, ``max_task_retries=-1``; passing them through
  ``map_batches`` is deprecated since Ray 2.60), so no row is lost; a row is written once, when its batch's
  block is complete.
* Ray Data writes the output: ``write_json`` puts one JSONL file per block into ``OUT.jsonl.shards/<run>/``.
  When the run ends the driver appends those rows to ``OUT.jsonl`` and removes the shards; the shards of an
  interrupted run stay and join OUT when the next run starts (:func:`pocketvlm.batch.output.merge_shards`).

Ray is imported here only, when a job asks for it (``pip install 'pocketvlm[ray]'``).
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from ..errors import DependencyError
from .output import merge_shards, shards_dir

INPUT_FIELDS = ("id", "image", "prompt", "error", "data")


def import_ray():
    """``ray`` with Ray Data, or a DependencyError naming the extra that installs it."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is a separate extra of ray
    except ImportError as e:
        raise DependencyError(f"running a batch job on Ray needs Ray Data, which is not installed ({e}); "
                              "pip install 'pocketvlm[ray]' (or 'ray[data]')") from None
    return ray


def run_ray(answerer_cls, answerer_kwargs: dict, rows: list[dict], out: Path, stats, *, address: str | None = None,
            actors: int = 1, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, batch_size: int = 8,
            progress: bool = True):
    """Answer ``rows`` on Ray Data (a local Ray when ``address`` is None and Ray is not running yet)."""
    ray = import_ray()
    if not ray.is_initialized():
        # A local Ray's workers import pocketvlm from where this process does; a cluster's have it installed.
        path = os.environ.get("PYTHONPATH") if address is None else None
        env = {"env_vars": {"PYTHONPATH": path}} if path else None
        ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env=env)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    items = [{k: r.get(k) for k in INPUT_FIELDS} for r in rows]
    target = shards_dir(out) / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    t0 = time.perf_counter()
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(-(-len(items) // batch_size), 1000)))
    ds = ds.map_batches(answerer_cls, fn_constructor_kwargs=answerer_kwargs, batch_size=batch_size,
                        batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None)
    ds.write_json(str(target))
    stats.seconds = time.perf_counter() - t0
    for row in merge_shards(out):
        stats.errors += "error" in row
        stats.answered += "error" not in row
    return stats
