"""pocketvlm.batch: caption or ask about every image of a folder, manifest or dataset, locally or on Ray Data.

See :mod:`pocketvlm.batch.runner` for what a job does and writes, :mod:`pocketvlm.batch.ray_runner` for Ray.
"""
from .inputs import read_rows
from .runner import CAPTION_PROMPT, Answerer, Stats, run, run_local

__all__ = ["run", "run_local", "read_rows", "Answerer", "Stats", "CAPTION_PROMPT"]
