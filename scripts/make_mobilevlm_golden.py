"""Make tests/data/mobilevlm_projectors.safetensors by running MobileVLM's ORIGINAL projector code.

MobileVLM's code is not part of pocketvlm: this script loads ``mobilevlm/model/vision_projector.py``
from a checkout of Meituan-AutoML/MobileVLM given on the command line, builds its ``ldpnet`` (v1) and
``ldpnetv2`` (V2) projectors through its own ``build_vision_projector`` with small sizes, perturbs
every parameter (so LayerNorm affines and biases are not at their 1/0 init), runs its forward on a
fixed random input, and saves state dicts (original ``model.mm_projector.*`` keys), input and outputs.

Needs torch, torchvision and timm (upstream pins timm 0.9.12). Run it in a throwaway venv, e.g.:

    git --git-dir=<mirror> archive HEAD mobilevlm/model/vision_projector.py | tar -x -C /tmp/mvlm
    /tmp/venv/bin/python scripts/make_mobilevlm_golden.py /tmp/mvlm --commit <sha> \\
        --out tests/data/mobilevlm_projectors.safetensors

Fixture keys: ``input`` [2, 576, 64]; ``<kind>.output``; ``<kind>.model.mm_projector.<param>`` for
kind in ``ldp``, ``ldpv2``.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

VISION_HIDDEN, TEXT_HIDDEN, GRID, BATCH = 64, 48, 24, 2


def load_upstream(checkout: Path):
    path = checkout / "mobilevlm" / "model" / "vision_projector.py"
    spec = importlib.util.spec_from_file_location("mobilevlm_vision_projector", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkout", type=Path, help="folder holding mobilevlm/model/vision_projector.py")
    ap.add_argument("--commit", required=True, help="upstream commit the checkout is from (recorded)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--skip-torchvision-meta", action="store_true",
                    help="torchvision wheels built for CUDA torch fail to register their detection ops' "
                         "meta kernels on CPU-only torch; those ops are unused by the projectors")
    args = ap.parse_args()

    if args.skip_torchvision_meta:
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import timm
    import torchvision

    upstream = load_upstream(args.checkout)
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(BATCH, GRID * GRID, VISION_HIDDEN, generator=gen)
    tensors = {"input": x}
    for kind, upstream_type in (("ldp", "ldpnet"), ("ldpv2", "ldpnetv2")):
        torch.manual_seed(0)
        cfg = SimpleNamespace(mm_hidden_size=VISION_HIDDEN, hidden_size=TEXT_HIDDEN, mm_projector_type=upstream_type)
        proj = upstream.build_vision_projector(cfg).eval()
        with torch.no_grad():
            for p in proj.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
            y = proj(x.clone())
        print(kind, type(proj).__name__, tuple(x.shape), "->", tuple(y.shape))
        tensors[f"{kind}.output"] = y
        for k, v in proj.state_dict().items():
            tensors[f"{kind}.model.mm_projector.{k}"] = v
    meta = {
        "upstream": "Meituan-AutoML/MobileVLM mobilevlm/model/vision_projector.py",
        "commit": args.commit,
        "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(args.out), metadata=meta)
    print("wrote", args.out, args.out.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
