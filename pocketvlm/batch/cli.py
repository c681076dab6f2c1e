"""The ``batch`` subcommand: ``pocketvlm batch caption|ask INPUT -o OUT.jsonl`` (registered by :func:`register_cli`)."""
from __future__ import annotations

import sys

from ..errors import DataError


def register_cli(sub) -> None:
    from ..cli import add_model_options

    p = sub.add_parser("batch", help="caption or ask about every image of a folder / manifest / dataset "
                                     "(locally, or on Ray with --ray)")
    tasks = p.add_subparsers(dest="task", required=True)
    for task, text in (("caption", "describe every image"), ("ask", "ask every image one question")):
        t = tasks.add_parser(task, help=text)
        t.add_argument("input", help="a folder of images (recursive), a .jsonl / .csv manifest (image, optional id "
                                     "and prompt), or a Hugging Face dataset saved with save_to_disk")
        t.add_argument("-o", "--output", required=True, metavar="OUT.jsonl",
                       help="one JSON row per input; rerunning with the same file resumes the job")
        t.add_argument("--model", default=None, help="the model (default: pocketvlm-scenes)")
        t.add_argument("--prompt", required=task == "ask", default=None,
                       help="the question (default for caption: 'Describe the image briefly.'); a manifest "
                            "row's own prompt wins")
        t.add_argument("--max-tokens", type=int, default=64, help="answer length limit (default 64)")
        t.add_argument("--batch-size", type=int, default=8, help="images per vision-tower batch (default 8)")
        t.add_argument("--allow-remote-images", action="store_true",
                       help="fetch http(s) image URLs (public hosts only; off by default)")
        t.add_argument("--ray", action="store_true", help="run on Ray Data (a local Ray unless --ray-address)")
        t.add_argument("--ray-address", default=None, metavar="ADDR", help="a Ray cluster, e.g. ray://head:10001")
        t.add_argument("--actors", type=int, default=1, help="Ray: model copies (actors) (default 1)")
        t.add_argument("--cpus-per-actor", type=float, default=1.0, help="Ray: CPUs per actor (default 1)")
        t.add_argument("--gpus-per-actor", type=float, default=0.0, help="Ray: GPUs per actor (default 0)")
        t.add_argument("--threads", type=int, default=None,
                       help="torch threads per model copy (default: torch's own locally, --cpus-per-actor on Ray); "
                            "runs with equal threads per copy give identical greedy answers")
        t.add_argument("--no-progress", action="store_true", help="no progress bar")
        add_model_options(t)
        t.set_defaults(fn=cmd_batch)


def cmd_batch(a) -> int:
    from ..cli import load_kwargs
    from .runner import run

    if a.ray_address is None and not a.ray and (a.actors != 1 or a.cpus_per_actor != 1 or a.gpus_per_actor):
        raise DataError("--actors, --cpus-per-actor and --gpus-per-actor are Ray options; add --ray")
    stats = run(a.input, a.output, task=a.task, prompt=a.prompt, load=load_kwargs(a), max_tokens=a.max_tokens,
                batch_size=a.batch_size, allow_remote_images=a.allow_remote_images, progress=not a.no_progress,
                ray=a.ray, ray_address=a.ray_address, actors=a.actors, cpus_per_actor=a.cpus_per_actor,
                gpus_per_actor=a.gpus_per_actor, threads=a.threads)
    print(f"{a.output}: {stats.line()}", file=sys.stderr)
    return 0
