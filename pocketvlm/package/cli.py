"""The ``convert``, ``package`` and ``fit`` subcommands (registered by :func:`register_cli`)."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import PackageError
from .bundle import fmt_bytes, table


def register_cli(sub) -> None:
    from ..quant import MODES

    modes = ", ".join(MODES)
    p = sub.add_parser("convert", help="quantize a model into a package folder (config, weights, tokenizer, manifest)")
    p.add_argument("source", help="HF folder or repo id, .gguf file, or built-in name")
    p.add_argument("--quantization", "-q", required=True, help=f"MLC mode: {modes}")
    p.add_argument("-o", "--output", required=True, help="package folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--dtype", default=None, help="dtype of tensors kept in float (default: the mode's)")
    p.add_argument("--context-window-size", type=int, default=None, help="for the manifest's memory estimate")
    p.add_argument("--prefill-chunk-size", type=int, default=512)
    p.add_argument("--scales", choices=("search", "rtn"), default="search",
                   help="group scales: error-minimising search (default) or MLC's plain max/offset; same format")
    p.add_argument("--calibrate", nargs="?", const=True, default=None, metavar="TEXT_FILE",
                   help="GPTQ rounding calibrated on a text (default: Python's own language reference, then other "
                        "standard-library docstrings); for a "
                        "vision-language model also a LLaVA-format .json/.jsonl of conversations with images")
    p.add_argument("--calibration-windows", type=int, default=None,
                   help="windows of 512 tokens taken from the calibration text (default 64), or conversations "
                        "taken from a .json/.jsonl file (default 128)")
    p.add_argument("--tune-steps", type=int, default=None,
                   help="with --calibrate: steps of block-wise tuning of each layer's rounding after GPTQ "
                        "(default 100; 0 = GPTQ alone, about 4x faster)")
    p.add_argument("--e2e-steps", type=int, default=None,
                   help="with --calibrate: then steps (one window each) of tuning every group scale against the "
                        "float model's next-token distribution, on every window of the text up to 256 (default: "
                        "one pass, 224 steps on the default text; 0 = none, about half the time)")
    p.add_argument("--mmproj", default=None, help="llama.cpp mmproj file that makes a .gguf source a VLM")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("package", help="convert the models of a package config into one bundle folder")
    p.add_argument("config", help="package config JSON: {device, model_list: [{model, model_id, quantization}]}")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_package)

    p = sub.add_parser("fit", help="do these models (together) fit a device's memory?")
    p.add_argument("models", nargs="*", help="package folders or model sources (estimated without loading weights)")
    p.add_argument("--device", default=None, help="device name or usable GB (e.g. iphone-13, 3.5)")
    p.add_argument("--all-devices", action="store_true", help="check every known device")
    p.add_argument("--quantization", "-q", default="q4f16_1", help="mode for sources and --params (default q4f16_1)")
    p.add_argument("--params", action="append", type=float, default=[],
                   help="a size-only model of this many parameters (e.g. 2.5e9); repeatable")
    p.add_argument("--context-window-size", type=int, default=None)
    p.add_argument("--prefill-chunk-size", type=int, default=512)
    p.add_argument("--dtype", default="float32", help="run dtype the estimate assumes")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(fn=cmd_fit)


def cmd_convert(a) -> int:
    from .convert import convert
    from ..loading.package_files import read_manifest

    out = convert(a.source, a.quantization, a.output, overwrite=a.overwrite, dtype=a.dtype,
                  context_window_size=a.context_window_size, prefill_chunk_size=a.prefill_chunk_size,
                  scales=a.scales, calibrate=a.calibrate, calibration_windows=a.calibration_windows,
                  tune_steps=a.tune_steps, e2e_steps=a.e2e_steps, mmproj=a.mmproj)
    m = read_manifest(out)
    p = m["parameters"]
    print(f"wrote {out}: {m['quantization']}, {p['total'] / 1e6:.1f}M parameters ({p['quantized'] / 1e6:.1f}M quantized, "
          f"{p['vision'] / 1e6:.1f}M vision), {fmt_bytes(m['bytes_on_disk'])} on disk, "
          f"estimated {fmt_bytes(m['memory']['bytes']['total'])} to run")
    return 0


def cmd_package(a) -> int:
    from .bundle import package, summary_table

    print(summary_table(package(a.config, a.output, overwrite=a.overwrite)))
    return 0


def cmd_fit(a) -> int:
    from . import devices
    from .memory import estimate_source

    if not a.models and not a.params:
        raise PackageError("name at least one model (package folder or source) or --params N")
    if not a.device and not a.all_devices:
        raise PackageError("pass --device NAME (or a number of GB) or --all-devices")
    from ..assistant_config import is_assistant_file
    from .memory import estimate_assistant

    rows = [estimate_assistant(m, a.context_window_size, a.prefill_chunk_size, a.dtype) if is_assistant_file(m)
            else estimate_source(m, a.quantization, a.context_window_size, a.prefill_chunk_size, a.dtype)
            for m in a.models]
    from .memory import params_estimate

    rows += [{"model": f"{n:.3g} params", "quantization": a.quantization, "bytes": params_estimate(n, a.quantization)}
             for n in a.params]
    total = sum(r["bytes"]["total"] for r in rows)
    targets = list(devices.DEVICES.values()) if a.all_devices else [devices.get_device(a.device)]
    results = [devices.fit(total, d) for d in targets]
    if a.json:
        print(json.dumps({"models": rows, "total_bytes": total, "devices": results}, indent=2))
        return 0
    t = [("model", "quant", "weights", "kv cache", "activations", "vision", "runtime", "load peak", "total")]
    for r in rows:
        b = r["bytes"]
        t.append((r["model"], r["quantization"], fmt_bytes(b["weights"] + b["kernel_cache"]), fmt_bytes(b["kv_cache"]),
                  fmt_bytes(b["activations"]), fmt_bytes(b["vision"]), fmt_bytes(b["runtime"]), fmt_bytes(b["load"]),
                  fmt_bytes(b["total"])))
    print("\n".join(table(t)))
    if len(rows) > 1:
        print(f"all models together: {fmt_bytes(total)} (runtime counted once per model: separate processes)")
    print()
    d = [("device", "RAM", "usable share", "usable", "needed", "fits")]
    for f, dev in zip(results, targets):
        d.append((dev.label, f"{dev.ram_gb:g} GB", f"{dev.share:.0%}", fmt_bytes(f["usable_bytes"]),
                  fmt_bytes(f["needed_bytes"]), "yes" if f["fits"] else "NO"))
    print("\n".join(table(d)))
    return 0 if all(f["fits"] for f in results) or a.all_devices else 1


def main(argv=None) -> int:  # pragma: no cover - `pocketvlm` is the entry point; this is for debugging
    ap = argparse.ArgumentParser(prog="pocketvlm")
    register_cli(ap.add_subparsers(dest="command", required=True))
    a = ap.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
