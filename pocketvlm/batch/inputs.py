"""What a batch job reads: rows ``{"id", "image", "prompt"}`` from a folder of images, a JSONL or CSV
manifest, or a Hugging Face ``datasets`` dataset saved with ``save_to_disk``.

* Folder: every image file below it (recursive, sorted); ``id`` is the path relative to the folder.
* Manifest (``.jsonl`` / ``.csv``): one row per line, ``image`` (a path relative to the manifest's folder, an
  absolute path or an http(s) URL), optional ``id`` (default: the line number) and ``prompt`` (default: the
  job's prompt). A row that cannot be read (bad JSON, no ``image``) becomes a row with an ``error``, so the
  job answers the others and the output says which line was wrong.
* Dataset on disk: the column ``image`` (a ``datasets.Image`` feature: its encoded bytes travel in the row
  as ``data``; or a path string), optional ``id`` and ``prompt`` columns; ``id`` defaults to the row index.

Rows are plain dicts (they cross process boundaries to Ray workers). Ids must be unique: they are the key
that resume uses.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Iterator

from ..cli import IMAGE_SUFFIXES
from ..errors import DataError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def read_rows(source: str | Path, prompt: str) -> Iterator[dict]:
    """Rows of ``source`` (folder, .jsonl/.csv manifest, or dataset folder); ``prompt`` where a row has none."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"batch input {str(path)!r} does not exist; give a folder of images, a .jsonl or .csv "
                        "manifest, or a dataset saved with datasets' save_to_disk")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return _dataset_rows(path, prompt)
        return _folder_rows(path, prompt)
    if path.suffix.lower() == ".jsonl":
        return _manifest_rows(path, _jsonl(path), prompt)
    if path.suffix.lower() == ".csv":
        return _manifest_rows(path, _csv(path), prompt)
    raise DataError(f"batch input {str(path)!r} is neither a folder nor a .jsonl / .csv manifest")


def unique_ids(rows: Iterator[dict]) -> Iterator[dict]:
    """``rows``, refusing a repeated id (resume could not tell the two rows apart)."""
    seen: set[str] = set()
    for row in rows:
        if row["id"] in seen:
            raise DataError(f"id {row['id']!r} appears twice in the input; ids must be unique")
        seen.add(row["id"])
        yield row


def _folder_rows(root: Path, prompt: str) -> Iterator[dict]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {str(root)!r}")
    for p in files:
        yield {"id": p.relative_to(root).as_posix(), "image": str(p.resolve()), "prompt": prompt}


def _jsonl(path: Path) -> Iterator[tuple[int, object]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, DataError(f"line {n}: not valid JSON ({e.msg} at column {e.colno})")


def _csv(path: Path) -> Iterator[tuple[int, object]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "image" not in reader.fieldnames:
            raise DataError(f"{path}: the CSV header needs an 'image' column (got {reader.fieldnames})")
        for n, row in enumerate(reader, 2):  # line 1 is the header
            yield n, row


def _manifest_rows(path: Path, rows: Iterator[tuple[int, object]], prompt: str) -> Iterator[dict]:
    for n, row in rows:
        rid = str(row["id"]) if isinstance(row, dict) and row.get("id") not in (None, "") else f"line-{n}"
        if isinstance(row, DataError):
            yield {"id": rid, "image": None, "prompt": prompt, "error": f"{path.name}, {row}"}
            continue
        if not isinstance(row, dict) or not row.get("image") or not isinstance(row["image"], str):
            yield {"id": rid, "image": None, "prompt": prompt,
                   "error": f"{path.name}, line {n}: a row needs an 'image' (a path or URL string)"}
            continue
        image = row["image"]
        if not _URL.match(image) or len(image.split(":", 1)[0]) == 1:  # a path (C: is a drive)
            p = Path(image).expanduser()
            image = str(p if p.is_absolute() else (path.parent / p).resolve())
        yield {"id": rid, "image": image, "prompt": row.get("prompt") or prompt}


def _dataset_rows(path: Path, prompt: str) -> Iterator[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{str(path)!r} is a Hugging Face dataset; reading it needs the datasets package "
                        "(pip install datasets)") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{str(path)!r} holds several splits ({', '.join(ds)}); give one split's folder")
    if "image" not in ds.column_names:
        raise DataError(f"the dataset {str(path)!r} has no 'image' column (columns: {', '.join(ds.column_names)})")
    if isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))  # encoded bytes: decoded by the runner
    for i, row in enumerate(ds):
        rid = str(row["id"]) if row.get("id") not in (None, "") else str(i)
        out = {"id": rid, "prompt": row.get("prompt") or prompt}
        image = row["image"]
        if isinstance(image, dict):  # {"bytes", "path"}
            out["image"] = image.get("path") or f"{path.name}[{i}]"
            if image.get("bytes"):
                out["data"] = image["bytes"]
        elif isinstance(image, str):
            out["image"] = image
        else:
            out.update(image=None, error=f"row {i}: the image column holds {type(image).__name__}")
        yield out
