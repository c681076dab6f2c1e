"""``pocketvlm train``: assemble a LLaVA from parts, then train stage 1 (projector) or 2 (projector + LoRA)."""
from __future__ import annotations

import argparse


def register_cli(sub) -> None:
    from .data import TURNS
    from .loop import PROJECTOR_INITS

    p = sub.add_parser("train", help="LLaVA-style training: stage 1 (projector) or 2 (projector + LoRA)",
                       description="Train a LLaVA folder on LLaVA-format data. With --llm and --vision, the base "
                                   "is first assembled from those parts (a fresh projector) into OUT/base.")
    p.add_argument("base", nargs="?", default=None, help="LLaVA folder to train (or use --llm/--vision)")
    p.add_argument("--llm", default=None, help="language model to assemble with (GGUF, HF folder or built-in name)")
    p.add_argument("--vision", default=None, help="vision tower folder (Dinov2Model, CLIPVisionModel or SiglipVisionModel), "
                   "or 'dinov2-vits14' for the real ViT-S/14")
    p.add_argument("--image-size", type=int, default=168,
                   help="input size (default 168; a CLIP or SigLIP tower needs its own, e.g. 336)")
    p.add_argument("--feature-layers", default="-1", help="comma-separated tower layers, concatenated (default -1)")
    p.add_argument("--data", required=True, help="LLaVA-format JSON (list of {id, image, conversations})")
    p.add_argument("--image-folder", default=None, help="where relative image paths point (default: the JSON's folder)")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--stage", type=int, choices=(1, 2), default=2)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="samples per optimizer step (gradient accumulation)")
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 for stage 1, 2e-4 for stage 2")
    p.add_argument("--warmup", type=float, default=0.03)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--turns", choices=TURNS, default="chat",
                   help="chat: a conversation is learned as one dialogue (LLaVA); independent: each question-answer "
                        "turn is learned alone with the image (packed in one row; for independent questions)")
    p.add_argument("--projector-init", choices=PROJECTOR_INITS, default="auto",
                   help="auto: a fresh projector calibrated on the data's image features at stage 1, the base's "
                        "projector kept at stage 2")
    p.add_argument("--init-from", default=None, metavar="FOLDER",
                   help="stage 2: start from a previous stage-2 output's (or a recipe folder's) projector and LoRA "
                        "adapter, to continue training on more data (the LoRA options must match the adapter's)")
    p.add_argument("--vision-lora-layers", type=int, default=0, metavar="N",
                   help="stage 2: LoRA on the vision tower's last N blocks up to its deepest feature layer too "
                        "(default 0: the tower stays frozen)")
    p.add_argument("--vision-lora-r", type=int, default=8)
    p.add_argument("--vision-lora-alpha", type=float, default=16.0)
    p.add_argument("--vision-lr", type=float, default=None, help="the tower LoRA's learning rate (default: --lr)")
    p.add_argument("--projector-lr", type=float, default=None, help="the projector's learning rate (default: --lr)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where native), float32 or bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(fn=cmd_train)


def cmd_train(a: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import ConfigError
    from .loop import TrainConfig, train

    base = a.base
    if base is None:
        if not (a.llm and a.vision):
            raise ConfigError("give a LLaVA folder to train, or --llm and --vision to assemble one")
        from ..real_models import resolve_source
        from .assemble import assemble_llava

        layers = tuple(int(x) for x in a.feature_layers.split(","))
        base = str(assemble_llava(resolve_source(a.llm), resolve_source(a.vision), Path(a.out) / "base",
                                  image_size=a.image_size, feature_layers=layers))
    cfg = TrainConfig(base=base, data=a.data, out=a.out, stage=a.stage, image_folder=a.image_folder, epochs=a.epochs,
                      max_steps=a.max_steps, max_samples=a.max_samples, batch_size=a.batch_size,
                      lr=a.lr if a.lr is not None else (1e-3 if a.stage == 1 else 2e-4), warmup=a.warmup,
                      lora_r=a.lora_r, lora_alpha=a.lora_alpha,
                      lora_targets=tuple(t.strip() for t in a.lora_targets.split(",") if t.strip()),
                      turns=a.turns, projector_init=a.projector_init, init_from=a.init_from,
                      vision_lora_layers=a.vision_lora_layers, vision_lora_r=a.vision_lora_r,
                      vision_lora_alpha=a.vision_lora_alpha, vision_lr=a.vision_lr, projector_lr=a.projector_lr,
                      device=a.device, dtype=a.dtype, seed=a.seed,
                      save_every=a.save_every, resume=a.resume)
    out = train(cfg)
    print(f"trained model: {out}")
    return 0
