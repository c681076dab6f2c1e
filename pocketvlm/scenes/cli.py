"""The ``scenes`` subcommand: write synthetic training data, or a held-out evaluation set with --eval."""
from __future__ import annotations

import json


def register_cli(sub) -> None:
    p = sub.add_parser("scenes", help="write synthetic scenes (shapes, text, bar charts) for training or evaluation")
    p.add_argument("out", help="output folder (images/ plus captions.json and instruct.json, or questions.jsonl)")
    p.add_argument("--eval", action="store_true", help="write held-out evaluation questions instead of training data")
    p.add_argument("--count", type=int, default=6000, help="training scenes to write (default 6000)")
    p.add_argument("--per-type", type=int, default=200, help="--eval: questions per question type (default 200)")
    p.add_argument("--types", default=None, help="comma-separated question types (default: all); for training "
                   "data a type may keep a fraction of its questions, e.g. count,chart,shape:0.25; training data may add "
                   "bars, questions naming bars by letter (is bar B taller than bar D?), never evaluated")
    p.add_argument("--seed", type=int, default=None, help="scene seed (default: 0 for training, 1 for --eval)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_scenes)


def cmd_scenes(a) -> int:
    from . import write_dataset, write_eval

    if a.eval:
        types = [t.strip() for t in a.types.split(",") if t.strip()] if a.types else None
        stats = write_eval(a.out, a.per_type, seed=1 if a.seed is None else a.seed, types=types,
                           progress=not a.no_progress)
    else:
        stats = write_dataset(a.out, a.count, seed=0 if a.seed is None else a.seed, types=a.types,
                              progress=not a.no_progress)
    print(f"wrote {a.out}: {json.dumps(stats)}")
    return 0
