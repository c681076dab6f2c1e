"""Put a LLaVA together from parts: a vision tower, a fresh MLP projector and a language model.

The result is a Hugging Face ``LlavaForConditionalGeneration`` folder (``config.json``, ``model.safetensors``,
tokenizer with an added ``<image>`` token and an image-aware chat template, ``preprocessor_config.json`` and
``processor_config.json``) that ``pocketvlm``, ``transformers`` and the trainer all load. This is the
"swap in another LLM or encoder" step of LLaVA-style retraining: the projector is the only new part.

Choices, stated once:
- the tower (DINOv2, CLIP or SigLIP) runs at ``image_size`` (a multiple of the patch): a DINOv2 tower's position
  grid is resampled to that size here (bicubic, exactly what Hugging Face's ``interpolate_pos_encoding`` computes
  on every call), so the saved tower is native at the size it is trained and served at; CLIP and SigLIP towers
  keep their own size (and their own image mean/std);
- ``vision_feature_layer`` may be a list: those hidden states are concatenated on the feature axis (as HF);
- the language model's weights are saved as they load (a GGUF source is dequantized to float32).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError

IMAGE_TOKEN = "<image>"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# ChatML, with content as a string or as parts ({"type": "image"} -> "<image>\n"); a short default system turn.
CHATML_VLM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def resample_positions(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """DINOv2 position table ``[1, 1 + n*n, D]`` -> ``[1, 1 + grid*grid, D]`` (class row kept)."""
    cls, patches = pos[:, :1], pos[:, 1:]
    n, dim = math.isqrt(patches.shape[1]), patches.shape[-1]
    if n == grid:
        return pos
    g = patches.reshape(1, n, n, dim).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([cls, g.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1)


def grow_vocab(weights: dict, new_id: int) -> None:
    """Append the ``<image>`` row as transformers' ``resize_token_embeddings`` does (the mean of the existing
    rows): the embedding row is never read (image features replace it), and the LM-head row scores every
    hidden state at the vocabulary's mean logit, far below the tokens a model predicts. (A negated, scaled
    mean made ``<image>`` the top prediction after every answer token: initial loss 33 nats/token.)"""
    emb = weights["model.language_model.embed_tokens.weight"]
    weights["model.language_model.embed_tokens.weight"] = torch.cat([emb, emb.mean(0, keepdim=True)])
    if "lm_head.weight" in weights:
        head = weights["lm_head.weight"]
        weights["lm_head.weight"] = torch.cat([head, head.mean(0, keepdim=True)])


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TOWERS = {"dinov2": (IMAGENET_MEAN, IMAGENET_STD), "clip_vision_model": (CLIP_MEAN, CLIP_STD),
          "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def _vision_part(vision_folder: Path, image_size: int) -> tuple[dict, dict, tuple, tuple]:
    """(vision config, tower weights, image mean, image std) of a Dinov2Model, CLIPVisionModel or SiglipVisionModel
    folder. DINOv2's position grid is resampled to ``image_size``; CLIP and SigLIP towers run at their own size."""
    from ..loading import read_config, read_safetensors, safetensors_files

    cfg = read_config(vision_folder)
    kind = cfg.get("model_type")
    if kind not in TOWERS:
        raise ConfigError(f"assembling a LLaVA from a {kind!r} tower is not supported; this step takes a "
                          f"{', '.join(TOWERS)} folder")
    patch = int(cfg["patch_size"])
    if image_size % patch:
        raise ConfigError(f"image_size {image_size} is not a multiple of the tower's patch size {patch}")
    if kind != "dinov2" and image_size != int(cfg["image_size"]):
        raise ConfigError(f"a {kind} tower runs at its own image size ({cfg['image_size']}), not {image_size}: "
                          f"pass image_size={cfg['image_size']}")
    w = read_safetensors(safetensors_files(vision_folder))
    if kind == "dinov2":
        w["embeddings.position_embeddings"] = resample_positions(w["embeddings.position_embeddings"], image_size // patch)
    mean, std = TOWERS[kind]
    pre = vision_folder / "preprocessor_config.json"
    if pre.is_file():  # the tower's own normalisation where it ships one
        pc = json.loads(pre.read_text())
        mean, std = tuple(pc.get("image_mean", mean)), tuple(pc.get("image_std", std))
    return {**cfg, "image_size": image_size}, w, mean, std


def _tokenizer_files(tok, out: Path, template: str) -> int:
    """tokenizer.json (with <image> added) + tokenizer_config.json + chat_template.jinja; returns <image>'s id."""
    from tokenizers import AddedToken

    backend = tok.backend
    if backend.token_to_id(IMAGE_TOKEN) is None:
        backend.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    backend.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 32768, "chat_template": template,
           "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token or tok.eos_token,
           "unk_token": tok.unk_token, "add_bos_token": bool(tok.add_bos_token), "add_eos_token": False,
           "image_token": IMAGE_TOKEN, "extra_special_tokens": {"image_token": IMAGE_TOKEN}}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    (out / "chat_template.jinja").write_text(template)
    return backend.token_to_id(IMAGE_TOKEN)


def processor_files(out: Path, image_size: int, patch_size: int, strategy: str,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, cls: bool = True) -> None:
    """``preprocessor_config.json`` (squash to image_size, no crop) and ``processor_config.json`` (LlavaProcessor)."""
    image_processor = {
        "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
        "do_resize": True, "size": {"height": image_size, "width": image_size}, "resample": 3,
        "do_center_crop": False, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(mean), "image_std": list(std), "do_convert_rgb": True}
    (out / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2))
    processor = {"processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN, "patch_size": patch_size,
                 "vision_feature_select_strategy": strategy, "num_additional_image_tokens": int(cls)}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))


def assemble_llava(llm_source, vision_folder, out, *, image_size: int = 168, feature_layers=(-1,),
                   strategy: str = "default", seed: int = 0, template: str = CHATML_VLM_TEMPLATE) -> Path:
    """Write a LLaVA folder made of ``llm_source`` (anything ``pocketvlm.loading.load`` reads: a GGUF file,
    an HF folder, a built-in name), the vision tower folder ``vision_folder`` (Dinov2Model, CLIPVisionModel or
    SiglipVisionModel) and a freshly initialised projector (``linear_1`` -> GELU -> ``linear_2``, nn.Linear's default init, seeded)."""
    from safetensors.torch import save_file

    from .. import loading

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    llm = loading.load(llm_source)
    tcfg = dict(llm.config_dict)
    if tcfg.get("model_type") != "qwen2" and "<|im_start|>" in template:
        raise ConfigError(f"the default ChatML template fits Qwen2 models; pass a template for {tcfg.get('model_type')!r}")
    vcfg, vw, mean, std = _vision_part(Path(vision_folder), image_size)
    if vcfg["model_type"] == "siglip_vision_model" and strategy == "default":
        strategy = "full"  # no class token to drop
    tok = loading.load_tokenizer(llm)
    image_id = _tokenizer_files(tok, out, template)
    if image_id > tcfg["vocab_size"]:
        raise ConfigError(f"<image> got id {image_id}, past the model's {tcfg['vocab_size']}-row embedding")
    layers = list(feature_layers)
    vdim, tdim = vcfg["hidden_size"], tcfg["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    proj = {}
    for name, (i, o) in {"linear_1": (vdim * len(layers), tdim), "linear_2": (tdim, tdim)}.items():
        bound = 1 / math.sqrt(i)  # nn.Linear's default (kaiming-uniform a=sqrt(5)) bound for weight and bias
        proj[f"model.multi_modal_projector.{name}.weight"] = (torch.rand(o, i, generator=g) * 2 - 1) * bound
        proj[f"model.multi_modal_projector.{name}.bias"] = (torch.rand(o, generator=g) * 2 - 1) * bound
    weights = {f"model.vision_tower.{k}": v for k, v in vw.items()}
    weights.update(proj)
    for k, v in llm.model.state_dict().items():
        if "rotary" in k or k.endswith("inv_freq"):
            continue
        weights[("lm_head." + k[len("lm_head."):]) if k.startswith("lm_head.")
                else "model.language_model." + k[len("model."):]] = v
    if image_id == tcfg["vocab_size"]:  # a full vocabulary: one more row (as llava-hf does for <image>)
        grow_vocab(weights, image_id)
        tcfg["vocab_size"] = image_id + 1
    tie = bool(tcfg.get("tie_word_embeddings"))
    if tie:
        weights.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
              "text_config": tcfg, "vision_config": vcfg, "image_token_index": image_id, "image_token_id": image_id,
              "projector_hidden_act": "gelu", "vision_feature_layer": layers[0] if len(layers) == 1 else layers,
              "vision_feature_select_strategy": strategy, "multimodal_projector_bias": True,
              "tie_word_embeddings": tie, "image_seq_length": (image_size // vcfg["patch_size"]) ** 2,
              "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    processor_files(out, image_size, vcfg["patch_size"], strategy, mean, std,
                    cls=vcfg["model_type"] != "siglip_vision_model")
    return out
