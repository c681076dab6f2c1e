"""A batch job's output: ``OUT.jsonl`` (one JSON object per line, one line per input row) and its identity
beside it in ``OUT.jsonl.job.json`` (model, load options, task, prompt, answer length).

Resume rules: a rerun with the same OUT reads the identity first and refuses to continue a different job
(another model, prompt or answer length would mix two jobs' answers in one file); then the ids already in
OUT are skipped. Every row is written as one line and flushed, so an interrupted job leaves complete lines;
a torn last line (the process killed in the middle of a write) is cut off before appending. A row whose
``prompt`` differs from the input's row with the same id also means a different job. Rows that an interrupted
Ray run left in ``OUT.jsonl.shards/`` join OUT when the next run starts, whichever runner it uses.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from ..errors import DataError


def job_path(out: Path) -> Path:
    return out.with_name(out.name + ".job.json")


def check_job(out: Path, job: dict) -> None:
    """Refuse to resume into ``out`` when it belongs to another job; write the identity when it is new."""
    out, jp = Path(out), job_path(Path(out))
    if jp.is_file():
        try:
            old = json.loads(jp.read_text())
        except json.JSONDecodeError:
            raise DataError(f"{jp} is not valid JSON; remove it (and {out}) to start over") from None
        diff = [k for k in sorted(set(old) | set(job)) if old.get(k) != job.get(k)]
        if diff:
            what = "; ".join(f"{k}: {old.get(k)!r} there, {job.get(k)!r} now" for k in diff)
            raise DataError(f"{out} holds another job's answers ({what}); write to another -o file, or remove "
                            f"{out} and {jp.name} to start over")
    elif out.is_file() and out.stat().st_size:
        raise DataError(f"{out} exists but has no {jp.name}: it is not a pocketvlm batch output; "
                        "write to another -o file")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = jp.with_name(jp.name + ".tmp")
        tmp.write_text(json.dumps(job, indent=1) + "\n")
        os.replace(tmp, jp)


def read_done(paths: Iterable[Path], repair: bool = False) -> dict[str, dict]:
    """Rows already written (by id) in ``paths``; a torn last line is ignored (``repair``: cut off)."""
    done = {}
    for path in paths:
        if not Path(path).is_file():
            continue
        with open(path, "rb+" if repair else "rb") as f:
            good = 0
            for line in f:
                try:
                    row = json.loads(line) if line.endswith(b"\n") else None
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict) or "id" not in row:
                    break  # a torn line is only ever the last one: nothing valid follows it
                done[str(row["id"])] = row
                good += len(line)
            if repair:
                f.truncate(good)
    return done


def skip_done(rows: Iterable[dict], done: dict[str, dict]) -> Iterable[dict]:
    """The rows not answered yet; a done row asked with another prompt is another job's."""
    for row in rows:
        old = done.get(row["id"])
        if old is None:
            yield row
        elif old.get("prompt") != row["prompt"]:
            raise DataError(f"row {row['id']!r} was answered for the prompt {old.get('prompt')!r}, the input now "
                            f"asks {row['prompt']!r}: another job; write to another -o file")


def clean(row: dict) -> dict:
    """An output row without empty fields and without the input's image bytes."""
    return {k: v for k, v in row.items() if v is not None and k != "data"}


def dumps(row: dict) -> str:
    return json.dumps(clean(row), ensure_ascii=False) + "\n"


def shards_dir(out: Path) -> Path:
    """Where Ray Data writes a job's output files (``OUT.jsonl.shards/<run>/``) before they join OUT."""
    return out.with_name(out.name + ".shards")


def merge_shards(out: Path) -> list[dict]:
    """Append the rows in ``OUT.jsonl.shards/`` (this run's and any interrupted run's) that ``out`` does not
    hold yet, then remove the shards. Returns the rows appended."""
    d = shards_dir(out)
    if not d.is_dir():
        return []
    have = read_done([out])
    new = [clean(r) for i, r in read_done(sorted(d.rglob("*.json*")), repair=True).items() if i not in have]
    with open(out, "a", encoding="utf-8") as f:
        f.writelines(dumps(row) for row in new)
    shutil.rmtree(d, ignore_errors=True)
    return new
