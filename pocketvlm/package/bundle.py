"""``pocketvlm package CONFIG.json -o DIR``: several models converted into one bundle folder, in the spirit
of MLC LLM's ``mlc-package-config.json``::

    {"device": "iphone",
     "model_list": [{"model": "path, .gguf or hub id", "model_id": "qwen-0.5b", "quantization": "q4f16_1",
                     "estimated_vram_bytes": 900000000,                      # optional
                     "overrides": {"context_window_size": 2048, "prefill_chunk_size": 256}}]}  # optional

The bundle has one package folder per ``model_id`` and a ``manifest.json`` listing them with their
estimated bytes (pocketvlm's estimate where the config gives none) and whether all fit the device.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ..errors import PackageError
from ..loading import package_files as files
from ..version import __version__
from . import devices
from .convert import check_output, convert

BUNDLE_FORMAT = "pocketvlm-bundle"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def read_config(path) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise PackageError(f"package config {p} not found")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PackageError(f"package config {p} is not valid JSON: {e}") from e
    validate(cfg)
    return cfg


def validate(cfg) -> None:
    """Missing or mistyped fields -> PackageError naming the field and the entry."""
    if not isinstance(cfg, dict):
        raise PackageError("package config must be a JSON object with 'device' and 'model_list'")
    for field, typ in (("device", str), ("model_list", list)):
        if field not in cfg:
            raise PackageError(f"package config is missing the field {field!r}")
        if not isinstance(cfg[field], typ):
            raise PackageError(f"package config field {field!r} must be a {typ.__name__}")
    if not cfg["model_list"]:
        raise PackageError("package config 'model_list' is empty")
    seen = set()
    for i, e in enumerate(cfg["model_list"]):
        where = f"model_list[{i}]" + (f" ({e.get('model_id')})" if isinstance(e, dict) and e.get("model_id") else "")
        if not isinstance(e, dict):
            raise PackageError(f"{where} must be an object")
        for field in ("model", "model_id", "quantization"):
            if field not in e:
                raise PackageError(f"{where} is missing the field {field!r}")
            if not isinstance(e[field], str) or not e[field]:
                raise PackageError(f"{where} field {field!r} must be a non-empty string")
        if not _ID.match(e["model_id"]):
            raise PackageError(f"{where} model_id {e['model_id']!r} must be a plain folder name (letters, digits, ._-)")
        if e["model_id"] in seen:
            raise PackageError(f"{where} repeats model_id {e['model_id']!r}")
        seen.add(e["model_id"])
        v = e.get("estimated_vram_bytes")
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise PackageError(f"{where} estimated_vram_bytes must be a positive integer")
        ov = e.get("overrides", {})
        if not isinstance(ov, dict):
            raise PackageError(f"{where} overrides must be an object")
        for k, val in ov.items():
            if k not in ("context_window_size", "prefill_chunk_size"):
                raise PackageError(f"{where} unknown override {k!r}; use context_window_size, prefill_chunk_size")
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise PackageError(f"{where} override {k} must be a positive integer")


def package(config, output, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Build the bundle; returns its manifest. ``config``: a dict or a path to the JSON file."""
    from ..quant import parse_mode

    cfg = config if isinstance(config, dict) else read_config(config)
    validate(cfg)
    for e in cfg["model_list"]:
        parse_mode(e["quantization"])  # every mode checked before the first (slow) conversion
    try:
        device = devices.get_device(cfg["device"])
    except Exception:
        device = None  # a free-form device name is allowed; the fit check needs a known one
    out = Path(output).expanduser()
    check_output(out, overwrite)
    models = []
    for e in cfg["model_list"]:
        ov = e.get("overrides") or {}
        ctx, chunk = ov.get("context_window_size"), ov.get("prefill_chunk_size", 512)
        folder = convert(e["model"], e["quantization"], out / e["model_id"], overwrite=overwrite,
                         context_window_size=ctx, prefill_chunk_size=chunk, progress=progress)
        m = files.read_manifest(folder)
        est = m["memory"]["bytes"]["total"]
        models.append({
            "model_id": e["model_id"], "model": e["model"], "quantization": e["quantization"], "path": e["model_id"],
            "estimated_vram_bytes": e.get("estimated_vram_bytes") or est,
            "estimated_by": "config" if e.get("estimated_vram_bytes") else "pocketvlm",
            "pocketvlm_estimate_bytes": est, "bytes_on_disk": m["bytes_on_disk"],
            "parameters": m["parameters"]["total"], "context_window_size": m["memory"]["context_window_size"],
            "prefill_chunk_size": chunk,
        })
    total = sum(m["estimated_vram_bytes"] for m in models)
    manifest = {"format": BUNDLE_FORMAT, "pocketvlm_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": cfg["device"],
                "model_list": models, "total_estimated_bytes": total}
    if device is not None:
        manifest["fit"] = devices.fit(total, device)
    (out / files.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def summary_table(manifest: dict) -> str:
    rows = [("model_id", "quantization", "params", "disk", "estimated", "source")]
    for m in manifest["model_list"]:
        rows.append((m["model_id"], m["quantization"], f"{m['parameters'] / 1e6:.1f}M", fmt_bytes(m["bytes_on_disk"]),
                     fmt_bytes(m["estimated_vram_bytes"]) + ("" if m["estimated_by"] == "pocketvlm" else " (config)"),
                     m["model"]))
    lines = table(rows)
    lines.append(f"total estimated: {fmt_bytes(manifest['total_estimated_bytes'])} for device {manifest['device']}")
    f = manifest.get("fit")
    if f:
        lines.append(f"{f['label']}: usable {fmt_bytes(f['usable_bytes'])} -> {'fits' if f['fits'] else 'does NOT fit'}")
    return "\n".join(lines)


def fmt_bytes(n: int) -> str:
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


def table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out
