"""The ``eval`` subcommand: VQA accuracy of a model with its blind baseline (registered by :func:`register_cli`)."""
from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import DataError

DEFAULT_PER_TYPE = 200


def register_cli(sub) -> None:
    from ..cli import add_model_options

    p = sub.add_parser("eval", help="VQA accuracy per question type, with a blind (gray image) baseline")
    p.add_argument("model", nargs="?", default=None, help="HF folder or repo id, .gguf file, package folder")
    p.add_argument("--data", default=None,
                   help="questions.jsonl / JSON list (or a folder holding questions.jsonl); default: the "
                        "held-out generated scenes set (pocketvlm.scenes, seed 1), made once in the cache")
    p.add_argument("--no-blind", action="store_true", help="skip the blind baseline (halves the run time)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    p.add_argument("--per-type", type=int, default=None,
                   help=f"at most N questions per type (also the size of the generated default set, "
                        f"default {DEFAULT_PER_TYPE})")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full report (with every answer) here")
    p.add_argument("--max-tokens", type=int, default=16, help="answer length limit (default 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(p)
    p.set_defaults(fn=cmd_eval)


def default_data(per_type: int) -> Path:
    """The held-out scenes set, generated once into the cache (a clear error without pocketvlm.scenes)."""
    from ..real_models import cache_dir

    try:
        scenes = importlib.import_module("pocketvlm.scenes")
    except ImportError:
        raise DataError("no --data given and the scene generator (pocketvlm.scenes) is not available; "
                        "pass --data PATH to a questions.jsonl") from None
    target = cache_dir() / f"scenes-eval-seed1-{per_type}"
    if (target / "questions.jsonl").is_file():
        return target
    print(f"generating the held-out scenes set ({per_type} per type) into {target}", file=sys.stderr)
    # Write beside the target and rename, so an interrupted run never leaves a half-written set behind.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        scenes.write_eval(tmp, per_type=per_type, seed=1)
        if not (tmp / "questions.jsonl").is_file():
            raise DataError(f"pocketvlm.scenes.write_eval did not write {tmp / 'questions.jsonl'}")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def cmd_eval(a) -> int:
    from ..cli import load_model
    from .vqa import load_questions, pocketvlm_answerer, run_eval

    for flag in ("limit", "per_type", "max_tokens"):
        v = getattr(a, flag)
        if v is not None and v < 1:
            raise DataError(f"--{flag.replace('_', '-')} must be at least 1 (got {v})")
    data = Path(a.data) if a.data else default_data(a.per_type or DEFAULT_PER_TYPE)
    questions = load_questions(data)  # every row checked before the (slow) model load
    model = load_model(a)
    answer_fn = pocketvlm_answerer(model, max_tokens=a.max_tokens)
    report = run_eval(answer_fn, questions, blind=not a.no_blind, progress=not a.no_progress,
                      limit=a.limit, per_type=a.per_type)
    report.meta.update(model=str(model.info()["source"]), data=str(data), max_tokens=a.max_tokens,
                       limit=a.limit, per_type=a.per_type)
    print(report.table())
    if a.json:
        out = Path(a.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.to_json() + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0
