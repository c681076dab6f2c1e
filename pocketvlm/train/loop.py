"""LLaVA's two-stage recipe on pocketvlm's own modules.

- stage 1 (``stage=1``): only the projector trains (tower and language model frozen), on captions;
- stage 2 (``stage=2``): the projector and LoRA adapters on the language model train, on instructions;
  optionally LoRA on the vision tower's last blocks too (``vision_lora_layers``; ``tower.py``).

A frozen tower's features are computed once per image (``cache_features``) and the step runs the projector,
the language model and the LM head only (with tower LoRA: the trained blocks from a cached state, too). The
LM head runs on the answer positions only (the loss counts answer tokens, nothing else), one sample per
micro-step (no padding), gradients accumulated over ``batch_size`` samples and averaged per answer token. On a
CPU that multiplies bf16 natively (AVX-512-BF16 / AMX) and on CUDA the frozen language model is held in bf16 and
the step runs under bf16 autocast; trainable weights and the optimizer stay float32.

Output folder: ``model.safetensors`` + configs + tokenizer (a Hugging Face ``LlavaForConditionalGeneration``
with the LoRA merged, merged in float32 on the base's float32 weights), ``projector.safetensors`` and
``adapter/`` (and ``vision_adapter/``; peft format) apart, ``train_config.json``, ``train_log.jsonl`` (one JSON
line per optimizer step), and while training ``checkpoint.pt`` (resumable: ``resume=True``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .data import IGNORE, Encoder, load_dataset
from . import tower
from .lora import apply_lora, load_adapter_state, merge_lora, save_adapter

PROJECTOR_INITS = ("auto", "calibrate", "keep")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COPY_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "preprocessor_config.json", "processor_config.json", "special_tokens_map.json", "generation_config.json")


@dataclass
class TrainConfig:
    base: str                      # a LLaVA folder (pocketvlm.train.assemble_llava, or a previous stage's output)
    data: str                      # LLaVA-format JSON
    out: str
    stage: int = 2
    image_folder: str | None = None
    epochs: float = 1.0
    max_steps: int | None = None   # optimizer steps; overrides epochs
    batch_size: int = 8            # samples per optimizer step (gradient accumulation)
    lr: float = 2e-4
    warmup: float = 0.03           # share of the steps
    min_lr_ratio: float = 0.1      # cosine decay to lr * this
    weight_decay: float = 0.0
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple = LORA_TARGETS
    device: str = "cpu"
    dtype: str = "auto"            # auto: bf16 where the hardware multiplies it natively, else float32
    seed: int = 0
    max_samples: int | None = None
    save_every: int = 100          # optimizer steps between checkpoints
    turns: str = "chat"            # "independent": each question-answer turn learned alone (data.load_dataset)
    projector_init: str = "auto"   # auto: calibrate at stage 1, keep at stage 2; or "calibrate" / "keep"
    init_from: str | None = None   # a previous stage-2 output or recipe folder: start from its projector and LoRA
    vision_lora_layers: int = 0    # stage 2: LoRA on the tower's last N blocks too (0: the tower stays frozen)
    vision_lora_r: int = 8
    vision_lora_alpha: float = 16.0
    vision_lr: float | None = None  # the tower LoRA's learning rate (default: lr)
    projector_lr: float | None = None   # the projector's learning rate (default: lr)
    resume: bool = False
    progress: bool = True

    def signature(self) -> str:
        """What a checkpoint must agree with to be resumed: the base model, data and the trained parts."""
        base_cfg = (Path(self.base) / "config.json").read_text() if (Path(self.base) / "config.json").exists() else ""
        # the base's path too: a stage-1 output has the same config.json as its base but other weights
        parts = [base_cfg, str(Path(self.base).resolve()), str(Path(self.data).resolve()), self.stage, self.lora_r,
                 self.lora_alpha, sorted(self.lora_targets) if self.stage == 2 else None, self.batch_size, self.seed,
                 self.turns, self.init_from and str(Path(self.init_from).resolve())]
        if self.vision_lora_layers:
            parts.append(self.tower_lora().as_dict())
        if self.projector_lr is not None:   # its own optimizer group
            parts.append({"projector_lr": self.projector_lr})
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]

    def tower_lora(self) -> tower.TowerLoRA | None:
        if not self.vision_lora_layers:
            return None
        return tower.TowerLoRA(self.vision_lora_layers, self.vision_lora_r, self.vision_lora_alpha)


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    if cfg.dtype in ("float32", "fp32"):
        return torch.float32
    if cfg.dtype in ("bfloat16", "bf16"):
        return torch.bfloat16
    if cfg.dtype != "auto":
        raise ConfigError(f"training dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.device.startswith("cuda"):
        return torch.bfloat16
    from ..quant.cpu_kernel import cpu_has_native_bf16

    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def load_base(folder, device="cpu"):
    """(Loaded LLaVA, tokenizer, image processor config) of a LLaVA folder."""
    from .. import loading
    from ..image import ImageProcessorConfig
    from ..tokenizer import Tokenizer

    folder = Path(folder)
    loaded = loading.load_hf(folder, device=device)
    if not hasattr(loaded.model, "image_hidden_states"):
        raise ConfigError(f"{folder} is not a LLaVA model (model_type {loaded.config_dict.get('model_type')!r})")
    tok = Tokenizer.from_folder(folder)
    if not tok.chat_template:
        raise ConfigError(f"{folder} has no chat template; training renders conversations with it")
    proc = ImageProcessorConfig.from_dict(loading.image_processor_dict(folder) or {})
    return loaded, tok, proc


@torch.no_grad()
def cache_features(model, proc, paths, *, batch: int = 16, progress: bool = True, device="cpu", encode=None) -> dict:
    """Selected tower features (before the projector) of each image, computed once: {path: [tokens, D] bf16};
    or ``{path: encode(pixel_values)[i]}``."""
    from tqdm.auto import tqdm

    from ..image import load_image, preprocess

    out = {}
    paths = sorted(set(paths), key=str)
    with tqdm(total=len(paths), desc="image features", unit="img", disable=not progress) as bar:
        for i in range(0, len(paths), batch):
            chunk = paths[i:i + batch]
            pix = torch.cat([preprocess(load_image(str(p)), proc, dtype=torch.float32, device=device).pixel_values
                             for p in chunk])
            if encode is not None:
                out.update(zip(map(str, chunk), encode(pix)))
            else:
                for p, f in zip(chunk, model.image_hidden_states(pix)):
                    out[str(p)] = f.to(torch.bfloat16).cpu().clone()
            bar.update(len(chunk))
    return out


def _median_rms(t: torch.Tensor) -> torch.Tensor:
    """The median over rows of each row's root mean square."""
    return t.float().pow(2).mean(-1).sqrt().median()


@torch.no_grad()
def calibrate_projector(model, feats: dict, *, seed: int = 0, max_rows: int = 50_000) -> dict:
    """Fresh, data-aware init of an MLP projector (``linear_1`` -> act -> ``linear_N``) from the training
    images' tower features: ``linear_1`` standardises every feature dimension (their mean and std folded into
    its weights and bias, so each hidden unit starts at unit variance) and the last linear is scaled so the
    image tokens start at the RMS of the language model's own token embeddings. With nn.Linear's default init
    DINOv2's image tokens start ~20x larger than Qwen2.5's text embeddings. Returns the measured scales."""
    proj = model.model.multi_modal_projector
    linears = [getattr(proj, f"linear_{i}") for i in range(1, getattr(proj, "depth", 0) + 1)]
    if not linears:
        raise ConfigError(f"projector_init='calibrate' needs an MLP projector, not {type(proj).__name__}")
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats.values()]).float()
    x = x[torch.randperm(len(x), generator=g)[:max_rows]]
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    for i, lin in enumerate(linears):
        w = torch.randn(lin.weight.shape, generator=g) / math.sqrt(lin.in_features)
        if i == 0:
            w = w / sd
        lin.weight.copy_(w)
        if lin.bias is not None:
            lin.bias.copy_(-(w @ mu) if i == 0 else torch.zeros_like(lin.bias))
    embed = model.get_input_embeddings()   # what text tokens enter the language model as (Gemma: scaled)
    dev = next(embed.parameters()).device
    vocab = model.config.text_config.vocab_size
    ids = torch.randperm(vocab, generator=g)[:4096].to(dev)
    target = _median_rms(embed(ids[None])[0]).cpu()
    x = x.to(linears[0].weight.dtype)
    scale = target / _median_rms(proj(x))
    linears[-1].weight.mul_(scale)
    if linears[-1].bias is not None:
        linears[-1].bias.mul_(scale)
    return {"feature_rms": float(_median_rms(x)), "embedding_rms": float(target),
            "image_token_rms": float(_median_rms(proj(x)))}


def trainable_state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


def trained_parts(cfg: TrainConfig) -> dict:
    """The projector and LoRA adapter of a previous stage-2 run (``init_from``: its output folder, with
    ``adapter/``, or a recipe folder, with the adapter files at the top), checked against ``cfg``'s LoRA."""
    from safetensors.torch import load_file

    if cfg.stage != 2:
        raise ConfigError("init_from continues a stage-2 run (projector + LoRA); use it with stage 2")
    if cfg.projector_init == "calibrate":
        raise ConfigError("init_from starts from a trained projector; projector_init='calibrate' would replace it")
    folder = Path(cfg.init_from)
    adapter = folder / "adapter" if (folder / "adapter").is_dir() else folder
    need = [folder / "projector.safetensors", adapter / "adapter_model.safetensors", adapter / "adapter_config.json"]
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        raise ConfigError(f"init_from {folder} is not a stage-2 output or recipe folder: missing {', '.join(missing)}")
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    have = (acfg.get("r"), float(acfg.get("lora_alpha", 0)), sorted(acfg.get("target_modules") or []))
    want = (cfg.lora_r, float(cfg.lora_alpha), sorted(set(cfg.lora_targets)))
    if have != want:
        raise ConfigError(f"{adapter} holds LoRA r={have[0]} alpha={have[1]} on {', '.join(have[2])}; this run "
                          f"asks for r={want[0]} alpha={want[1]} on {', '.join(want[2])}: use the adapter's settings")
    parts = {"projector": load_file(str(need[0])), "adapter": load_file(str(need[1]))}
    vdir = folder / tower.FOLDER
    vfiles = ((vdir / "adapter_config.json", vdir / "adapter_model.safetensors") if vdir.is_dir() else
              (folder / f"{tower.FOLDER}_config.json", folder / f"{tower.FOLDER}_model.safetensors"))
    spec = cfg.tower_lora()
    if vfiles[0].is_file():
        have = tower.spec_of(json.loads(vfiles[0].read_text()))
        if spec is None or not have.same_shape(spec):
            raise ConfigError(f"{folder} holds vision-tower LoRA on the last {have.layers} blocks, r={have.r} "
                              f"alpha={have.alpha}; this run asks for "
                              + (f"{spec.layers} blocks, r={spec.r} alpha={spec.alpha}" if spec else "none")
                              + ": use the adapter's settings (--vision-lora-layers/-r/-alpha)")
        parts["vision"] = load_file(str(vfiles[1]))
    return parts


def load_trained(model, projector: dict, adapter: dict | None = None, vision: dict | None = None) -> None:
    """A trained projector state (``model.multi_modal_projector.*``) and, when given, peft-named LoRA tensors
    of the language model and of the tower into the model (its LoRA layers already applied), in float32."""
    model.model.multi_modal_projector.load_state_dict(
        {k.split("multi_modal_projector.", 1)[1]: v.float() for k, v in projector.items()})
    if adapter is not None:
        load_adapter_state(model.model.language_model, {k: v.float() for k, v in adapter.items()},
                           prefix="model.language_model.")
    if vision is not None:
        tower.load(model, vision)


def _start_from(model, init: dict) -> None:
    """Load a previous run's projector and adapter into the model (LoRA already applied)."""
    try:
        load_trained(model, init["projector"], init["adapter"], init.get("vision"))
    except RuntimeError as e:
        raise ConfigError(f"the init_from parts do not fit this base: {e}") from None


def _packing(sample, device) -> dict:
    """Attention mask and positions of independent turns packed in one row (none for a plain sample)."""
    if sample.segments is None:
        return {}
    seg = torch.tensor(sample.segments, device=device)
    pairs = (seg[None, :] == 0) | (seg[None, :] == seg[:, None])   # a turn sees the prefix and itself
    return {"attention_mask": pairs[None, None], "position_ids": torch.tensor([sample.positions], device=device)}


def _step_loss(model, sample, feats, dtype, device):
    ids = torch.tensor([sample.input_ids], device=device)
    labels = torch.tensor([sample.labels], device=device)
    target = labels[:, 1:]
    keep = target != IGNORE
    if not bool(keep.any()):
        raise ConfigError(f"sample {sample.id!r} has no answer token to learn from")
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
        x = feats() if callable(feats) else feats.to(device).float()   # callable: runs the trained tower blocks
        img = model.model.multi_modal_projector(x[None])
        emb = model.embed(ids, img)
        h = model.model.language_model(inputs_embeds=emb, **_packing(sample, device))
        logits = model.lm_head(h[:, :-1][keep])
    return F.cross_entropy(logits.float(), target[keep], reduction="sum"), int(keep.sum())


def _param_groups(model, cfg: TrainConfig) -> list[dict]:
    """The trainable parameters by learning rate: the tower's LoRA (``vision_lr``), the projector
    (``projector_lr``), the language model's LoRA (``lr``); ``scale`` is a group's lr over the schedule's."""
    def scale(lr):
        return lr / cfg.lr if lr is not None and cfg.lr else 1.0

    prefixes = {tower.PREFIX: scale(cfg.vision_lr)}
    if cfg.projector_lr is not None:   # else the projector stays in the language model's group (as before)
        prefixes["model.multi_modal_projector."] = scale(cfg.projector_lr)
    by_group: dict = {"": []}
    for n, p in model.named_parameters():
        if p.requires_grad:
            key = next((k for k in prefixes if n.startswith(k)), "")
            by_group.setdefault(key, []).append(p)
    return [{"params": ps, "scale": prefixes.get(k, 1.0)} for k, ps in by_group.items() if ps]


def train(cfg: TrainConfig) -> Path:
    """Run one stage; returns the output folder (a LLaVA folder with the trained parts merged)."""
    from tqdm.auto import tqdm

    if cfg.stage not in (1, 2):
        raise ConfigError(f"stage must be 1 (projector) or 2 (projector + LoRA), got {cfg.stage}")
    if cfg.projector_init not in PROJECTOR_INITS:
        raise ConfigError(f"projector_init must be {', '.join(PROJECTOR_INITS)}, got {cfg.projector_init!r}")
    spec = cfg.tower_lora()
    if spec is not None and cfg.stage != 2:
        raise ConfigError("vision-tower LoRA trains at stage 2, with the language model's adapters")
    init = trained_parts(cfg) if cfg.init_from else None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if cfg.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    dtype = compute_dtype(cfg)
    loaded, tok, proc = load_base(cfg.base, cfg.device)
    model = loaded.model
    enc = Encoder(tok, tok.chat_template, model.image_token_id, model.num_image_tokens())
    ds = load_dataset(cfg.data, enc, image_folder=cfg.image_folder, max_samples=cfg.max_samples, turns=cfg.turns)
    print(f"data: {ds.report()}", flush=True)

    lm = model.model.language_model
    lm.to(dtype)
    model.lm_head.to(dtype)
    targets = []
    if cfg.stage == 2:
        targets = apply_lora(lm, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, prefix="model.language_model.")
    start = None
    if spec is not None:
        start = tower.first_trained(model, spec)
        tower.apply(model, spec)
    if init is not None:
        _start_from(model, init)
    model.model.multi_modal_projector.requires_grad_(True)
    groups = _param_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))

    per_epoch = math.ceil(len(ds.samples) / cfg.batch_size)
    total = cfg.max_steps or max(1, int(per_epoch * cfg.epochs))
    sig = cfg.signature()
    step, log_f = 0, out / "train_log.jsonl"
    ckpt = out / "checkpoint.pt"
    if cfg.resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("signature") != sig:
            raise ConfigError(f"{ckpt} was written for another model, data or training setup "
                              f"(signature {state.get('signature')} != {sig}); start a new output folder")
        model.load_state_dict(state["trainable"], strict=False)
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resumed at step {step} of {total}", flush=True)
    elif log_f.exists():
        log_f.unlink()

    encode = None if start is None else (lambda pix: tower.cache_states(model, pix, start))
    feats = cache_features(model, proc, [s.image for s in ds.samples], progress=cfg.progress, device=cfg.device,
                           encode=encode)
    calibration = None
    if step == 0 and init is None and (cfg.projector_init == "calibrate"
                                       or (cfg.projector_init == "auto" and cfg.stage == 1)):
        if start is not None:
            raise ConfigError("projector_init='calibrate' with vision-tower LoRA: calibrate the projector at stage 1")
        calibration = calibrate_projector(model, feats, seed=cfg.seed)
        print(f"projector calibrated: {calibration}", flush=True)
    (out / "train_config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "total_steps": total,
                                                      "trainable_parameters": n_train, "compute_dtype": str(dtype),
                                                      "samples": len(ds.samples), "skipped": dict(ds.skipped),
                                                      "projector_calibration": calibration},
                                                     indent=2, default=str))

    def order(epoch):
        idx = list(range(len(ds.samples)))
        random.Random(cfg.seed * 1000 + epoch).shuffle(idx)
        return idx

    t0, done_samples = time.time(), 0
    bar = tqdm(total=total, initial=step, desc=f"stage {cfg.stage}", unit="step", disable=not cfg.progress)
    model.train()
    while step < total:
        epoch, pos = divmod(step * cfg.batch_size, len(ds.samples))
        idx = order(epoch)
        group = [ds.samples[idx[(pos + j) % len(idx)]] for j in range(cfg.batch_size)]
        lr = lr_at(step, total, cfg)
        for g in opt.param_groups:
            g["lr"] = lr * g["scale"]
        opt.zero_grad(set_to_none=True)
        n_tok = sum(sum(1 for t in s.labels[1:] if t != IGNORE) for s in group)
        loss_sum = 0.0
        for s in group:
            f = feats[str(s.image)]
            if start is not None:
                f = (lambda c=f: tower.features(model, c, start, cfg.device))
            loss, _ = _step_loss(model, s, f, dtype, cfg.device)
            (loss / n_tok).backward()
            loss_sum += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        done_samples += len(group)
        rate = done_samples / (time.time() - t0)
        rec = {"step": step, "loss": loss_sum / n_tok, "lr": lr, "samples_per_s": round(rate, 3),
               "elapsed_s": round(time.time() - t0, 1), "epoch": round(step * cfg.batch_size / len(ds.samples), 3)}
        with open(log_f, "a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.set_postfix(loss=f"{rec['loss']:.3f}", samples_s=f"{rate:.2f}")
        bar.update()
        if step % cfg.save_every == 0 or step == total:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"signature": sig, "step": step, "trainable": trainable_state(model),
                        "optimizer": opt.state_dict()}, tmp)
            tmp.replace(ckpt)
    bar.close()
    model.eval()
    return finish(cfg, model, targets)


def finish(cfg: TrainConfig, trained, targets) -> Path:
    """Save projector and adapters apart, then a full LLaVA folder: the base's float32 weights with the
    trained projector and the LoRA merged in float32."""
    from safetensors.torch import save_file

    out, base = Path(cfg.out), Path(cfg.base)
    proj = {f"model.multi_modal_projector.{k}": v.detach().float().cpu().contiguous()
            for k, v in trained.model.multi_modal_projector.state_dict().items()}
    save_file(proj, str(out / "projector.safetensors"), metadata={"format": "pt"})
    lm = trained.model.language_model
    if targets:
        save_adapter(lm, out / "adapter", r=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                     prefix="model.language_model.", base_model=str(base))
    adapter = None
    if targets:
        from safetensors.torch import load_file

        adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lora = {"targets": cfg.lora_targets, "r": cfg.lora_r, "alpha": cfg.lora_alpha}
    vision, spec = None, cfg.tower_lora()
    if spec is not None:   # merged as saved (float16), as the language model's adapter is
        from safetensors.torch import load_file

        folder = tower.save(trained, out / tower.FOLDER, spec, base_model=str(base))
        vision = {"state": load_file(str(folder / "adapter_model.safetensors")), "spec": spec}
    fresh = merged_llava(base, proj, adapter, lora, vision)
    save_llava(fresh, base, out)
    return out


def merged_llava(base: Path, projector: dict, adapter: dict | None = None, lora: dict | None = None,
                 vision: dict | None = None):
    """The base folder's float32 LLaVA with a trained projector state (``model.multi_modal_projector.*``) and,
    when given, peft-named LoRA tensors (``lora``: targets, r, alpha) merged in float32; ``vision``: the
    tower's LoRA (``{"state", "spec": TowerLoRA}``) merged likewise."""
    from .. import loading

    model = loading.load_hf(Path(base)).model
    lm = model.model.language_model
    if adapter is not None:
        apply_lora(lm, lora["targets"], lora["r"], lora["alpha"])
    if vision is not None:
        tower.apply(model, vision["spec"])
    load_trained(model, projector, adapter, vision and vision["state"])
    if adapter is not None:
        merge_lora(lm)
    if vision is not None:
        tower.merge(model)
    return model


def save_llava(model, base: Path, out: Path) -> None:
    """The model's weights under transformers-5 names + the base folder's configs and tokenizer files."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
             if "rotary" not in k and not k.endswith("inv_freq")}
    cfg = json.loads((base / "config.json").read_text())
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in COPY_FILES:
        if (base / name).exists() and (base / name).resolve() != (out / name).resolve():
            shutil.copyfile(base / name, out / name)
