"""The ``export`` subcommand: ``pocketvlm export gguf MODEL -o DIR [--type ...]``."""
from __future__ import annotations


def register_cli(sub) -> None:
    from . import TYPES

    p = sub.add_parser("export", help="write a model in another engine's format (gguf: for llama.cpp)")
    fmt = p.add_subparsers(dest="format", required=True)
    g = fmt.add_parser("gguf", help="llama.cpp GGUF: <name>.gguf (+ mmproj-<name>.gguf for a VLM)")
    g.add_argument("model", help="HF folder or repo id, .gguf file, or built-in name (e.g. pocketvlm-scenes)")
    g.add_argument("-o", "--output", required=True, help="folder for the .gguf file(s)")
    g.add_argument("--type", default="f16", choices=TYPES,
                   help="tensor type of the weights (q4_k_m runs llama.cpp's llama-quantize on the f16 file)")
    g.add_argument("--name", default=None, help="file name stem (default: the model's folder or file name)")
    g.set_defaults(fn=cmd_export_gguf)


def cmd_export_gguf(a) -> int:
    from . import export_gguf

    r = export_gguf(a.model, a.output, type=a.type, name=a.name)
    print(f"wrote {r['model']}")
    if r["mmproj"]:
        print(f"wrote {r['mmproj']}")
        print(f"run it with llama.cpp: llama-mtmd-cli -m {r['model']} --mmproj {r['mmproj']} --image IMAGE "
              "-p 'QUESTION' --jinja")
    return 0
