"""llama.cpp vision-language models as two GGUF files: the language model and an ``mmproj`` file (``mtmd``: vision
tower + projector). :func:`load_gguf_vlm` joins them into pocketvlm's ``llava`` (MLP projector) or ``mobilevlm``
(LDP / LDPv2 projector) model: the language model is
loaded by :func:`pocketvlm.loading.load_gguf` (its quantized blocks kept, or any mode), the tower and projector
are dequantized from the mmproj file (f32, f16, q8_0, ... ) and then follow the usual vision precision.

Supported mmproj contents: ``clip.projector_type`` ``"mlp"`` (LLaVA-1.5 style; files from llama.cpp's legacy
converter, which only say ``clip.has_llava_projector``, too), ``"ldp"`` and ``"ldpv2"`` (MobileVLM) over a CLIP (class token and ``pre_ln``), SigLIP
(no class token) or DINOv2-style tower (``v.blk.N.ls1/ls2`` layer scale). The feature layers are the file's
``clip.vision.feature_layer`` (Hugging Face hidden-state indices), else the output of the last stored layer (the
legacy converter stores the layers up to LLaVA's ``vision_feature_layer`` only). The image size, patch size,
mean and std come from the file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError, CorruptWeightsError, UnsupportedArchitectureError
from .core import Loaded, meta_model

SUPPORTED_PROJECTORS = ("mlp", "ldp", "ldpv2")
# projector types llama.cpp knows that pocketvlm does not read yet, with what they are
KNOWN_PROJECTORS = {"mlp_norm": "MLP with norms",
                    "resampler": "MiniCPM-V resampler", "glm_edge": "GLM-Edge", "gemma3": "Gemma 3",
                    "idefics3": "Idefics3/SmolVLM", "pixtral": "Pixtral", "qwen2vl_merger": "Qwen2-VL",
                    "qwen2.5vl_merger": "Qwen2.5-VL", "internvl": "InternVL", "llama4": "Llama 4"}

_LAYER = {  # llama.cpp per-layer names -> (CLIP/SigLIP suffix, DINOv2 suffix)
    "ln1": ("layer_norm1", "norm1"), "ln2": ("layer_norm2", "norm2"),
    "attn_q": ("self_attn.q_proj", "attention.attention.query"),
    "attn_k": ("self_attn.k_proj", "attention.attention.key"),
    "attn_v": ("self_attn.v_proj", "attention.attention.value"),
    "attn_out": ("self_attn.out_proj", "attention.output.dense"),
    "ffn_up": ("mlp.fc1", "mlp.fc1"), "ffn_down": ("mlp.fc2", "mlp.fc2"),
}


# tower parts that LLaVA's features never pass through (the final norm, SigLIP's pooling head): not in mmproj files
_UNUSED = ("vision_model.post_layernorm.", "vision_model.head.", "layernorm.")


def read_mmproj(path: Path):
    """The parsed mmproj file, refusing a language-model GGUF with a message that says which is which."""
    from .gguf_file import read_gguf

    reader = read_gguf(path)
    arch = reader.metadata.get("general.architecture")
    if arch != "clip":
        raise ConfigError(f"{path} is not an mmproj file (general.architecture = {arch!r}, not 'clip'): it looks "
                          "like a language model; pass it as the model and the mmproj file as mmproj")
    if not reader.metadata.get("clip.has_vision_encoder", True):
        raise UnsupportedArchitectureError(f"{path} has no vision encoder (an audio-only mmproj?)")
    return reader


def projector_type(meta: dict) -> str:
    kind = meta.get("clip.projector_type") or meta.get("clip.vision.projector_type")
    if kind is None and meta.get("clip.has_llava_projector"):
        kind = "mlp"  # llama.cpp's legacy LLaVA converter
    if kind not in SUPPORTED_PROJECTORS:
        what = f" ({KNOWN_PROJECTORS[kind]})" if kind in KNOWN_PROJECTORS else ""
        raise UnsupportedArchitectureError(
            f"mmproj projector type {kind!r}{what} is not supported by pocketvlm; supported: "
            f"{', '.join(SUPPORTED_PROJECTORS)} (LLaVA-1.5 style MLP; MobileVLM's LDP and LDPv2)")
    return kind


def tower_type(meta: dict, names: set[str]) -> str:
    declared = meta.get("pocketvlm.vision.model_type")
    if declared:
        return declared
    if "v.blk.0.ls1.weight" in names:
        return "dinov2"
    return "clip_vision_model" if "v.class_embd" in names else "siglip_vision_model"


def vision_config(meta: dict, kind: str) -> dict:
    g = lambda k, default=None: meta.get(f"clip.vision.{k}", default)  # noqa: E731
    missing = [k for k in ("image_size", "patch_size", "embedding_length", "block_count", "attention.head_count")
               if g(k) is None]
    if missing:
        raise CorruptWeightsError(f"mmproj metadata lacks clip.vision.{missing[0]}: the file is incomplete")
    act = meta.get("pocketvlm.vision.hidden_act")
    if act is None:
        act = {"clip_vision_model": "gelu_pytorch_tanh" if meta.get("clip.use_gelu") else "quick_gelu",
               "siglip_vision_model": "gelu_pytorch_tanh", "dinov2": "gelu"}[kind]
    d = {"model_type": kind, "hidden_size": int(g("embedding_length")), "num_hidden_layers": int(g("block_count")),
         "num_attention_heads": int(g("attention.head_count")), "image_size": int(g("image_size")),
         "patch_size": int(g("patch_size")), "hidden_act": act,
         "layer_norm_eps": float(g("attention.layer_norm_epsilon", 1e-6 if kind == "dinov2" else 1e-5))}
    ff = g("feed_forward_length")
    if kind == "dinov2":
        d["mlp_ratio"] = int(ff) / d["hidden_size"] if ff else 4
        d["use_mask_token"] = False
    else:
        d["intermediate_size"] = int(ff)
    return d


def tower_weights(reader, kind: str, load) -> dict[str, torch.Tensor]:
    """The tower's weights under pocketvlm's (Hugging Face) names, dequantized to float32."""
    dino = kind == "dinov2"
    out: dict[str, torch.Tensor] = {}
    prefix = "" if dino else "vision_model."
    emb = {"v.class_embd": "embeddings.cls_token" if dino else "embeddings.class_embedding",
           "v.patch_embd.weight": "embeddings.patch_embeddings.projection.weight" if dino
           else "embeddings.patch_embedding.weight",
           "v.patch_embd.bias": "embeddings.patch_embeddings.projection.bias" if dino
           else "embeddings.patch_embedding.bias",
           "v.position_embd.weight": "embeddings.position_embeddings" if dino else "embeddings.position_embedding.weight",
           "v.pre_ln.weight": "pre_layrnorm.weight", "v.pre_ln.bias": "pre_layrnorm.bias"}
    for t in reader.tensors:
        name = t.name
        if name.startswith("mm."):
            continue
        if name in emb:
            out[prefix + emb[name]] = load(t)
            continue
        parts = name.split(".")
        if parts[0] == "v" and parts[1] == "blk" and len(parts) == 5:
            i, what, attr = parts[2], parts[3], parts[4]
            if what in ("ls1", "ls2") and dino:
                out[f"encoder.layer.{i}.layer_scale{what[-1]}.lambda1"] = load(t)
                continue
            if what in _LAYER:
                ours = _LAYER[what][1 if dino else 0]
                layer = f"encoder.layer.{i}." if dino else f"vision_model.encoder.layers.{i}."
                out[layer + f"{ours}.{attr}"] = load(t)
                continue
        if name in ("v.post_ln.weight", "v.post_ln.bias"):
            continue  # applied to pooled outputs only, never to LLaVA's features
        raise UnsupportedArchitectureError(f"mmproj tensor {name!r} has no counterpart in pocketvlm's {kind} tower")
    if dino:
        out["embeddings.cls_token"] = out["embeddings.cls_token"].reshape(1, 1, -1)
        out["embeddings.position_embeddings"] = out["embeddings.position_embeddings"][None]
    return _unswap_ffn(out, dino)


def _unswap_ffn(w: dict, dino: bool) -> dict:
    """Files from old converters hold fc1/fc2 under each other's names: put them back by shape."""
    for key in [k for k in w if k.endswith("mlp.fc1.weight")]:
        up, down = w[key], w[key.replace("fc1", "fc2")]
        if up.shape[0] < up.shape[1] and down.shape[0] > down.shape[1]:  # fc1 widens, fc2 narrows
            base = key[: -len("fc1.weight")]
            for a in ("weight", "bias"):
                w[base + "fc1." + a], w[base + "fc2." + a] = w[base + "fc2." + a], w[base + "fc1." + a]
    return w


# the first and last projection of each projector type: (input width, output width) come from their shapes
_PROJ_ENDS = {"mlp": ("mm.0.weight", "mm.2.weight"), "ldp": ("mm.model.mlp.1.weight", "mm.model.mlp.3.weight"),
              "ldpv2": ("mm.model.mlp.0.weight", "mm.model.mlp.2.weight")}


def load_gguf_vlm(text_path: Path, mmproj_path: Path, *, device="cpu", dtype=torch.float32,
                  max_seq_len: int | None = None, quantization: str | None = None) -> Loaded:
    """A llava (MLP projector) or mobilevlm (LDP / LDPv2) model from a language-model GGUF and an mmproj GGUF
    (see the module docstring)."""
    from ..models import llava
    from .gguf import _read_tensor, gguf_tensor_to_torch, load_gguf
    from .gguf_file import read_gguf_metadata

    text_meta = read_gguf_metadata(text_path)
    if text_meta.get("general.architecture") == "clip":
        raise ConfigError(f"{text_path} is an mmproj file (vision tower and projector), not a language model: pass "
                          "the language model's .gguf as the model and this file as mmproj")
    reader = read_mmproj(Path(mmproj_path))
    meta = reader.metadata
    proj_kind = projector_type(meta)
    names = {t.name for t in reader.tensors}
    kind = tower_type(meta, names)
    vcfg = llava.vision_family(kind).Config.from_dict(vision_config(meta, kind))
    proj_in = reader_shape(reader, _PROJ_ENDS[proj_kind][0])
    proj_out = reader_shape(reader, _PROJ_ENDS[proj_kind][1])
    layers = meta.get("clip.vision.feature_layer")
    layers = tuple(int(x) for x in layers) if layers is not None and len(layers) else (vcfg.num_hidden_layers,)
    if proj_in[1] != vcfg.hidden_size * len(layers):
        raise CorruptWeightsError(f"{mmproj_path}: the projector takes {proj_in[1]} features, the tower gives "
                                  f"{vcfg.hidden_size} x {len(layers)} layer(s)")
    text = load_gguf(Path(text_path), device=device, dtype=dtype, max_seq_len=max_seq_len, quantization=quantization)
    if proj_out[0] != text.config.hidden_size:
        raise ConfigError(f"{mmproj_path} projects images to width {proj_out[0]} but the language model "
                          f"{Path(text_path).name} has hidden size {text.config.hidden_size}: they are not a pair")
    load = lambda t: _read_tensor(gguf_tensor_to_torch, t, mmproj_path)  # noqa: E731
    tower = llava.vision_family(kind).Model(vcfg)
    _load_strict(tower, _complete_tower(tower, tower_weights(reader, kind, load), vcfg, kind), mmproj_path)
    strategy = "default" if "v.class_embd" in names else "full"
    join = _join_llava if proj_kind == "mlp" else _join_mobilevlm
    model, cfg, family = join(text, tower, reader, load, meta, layers, strategy, proj_kind, max_seq_len)
    for m in _vision_modules(model):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.eval().requires_grad_(False)
    mean = [float(x) for x in meta.get("clip.vision.image_mean", (0.5, 0.5, 0.5))]
    std = [float(x) for x in meta.get("clip.vision.image_std", (0.5, 0.5, 0.5))]
    text.model, text.config, text.family = model, cfg, family
    text.config_dict = _config_dict(text.config_dict, cfg, vision_config(meta, kind))
    text.image_processor = image_processor(meta.get("pocketvlm.image.resize", "pad"), vcfg.image_size, mean, std)
    text.mmproj = str(mmproj_path)
    return text


def _config_dict(text_dict: dict, cfg, vision_dict: dict) -> dict:
    """The joined model as a Hugging Face style config.json dict (what ``pocketvlm convert`` saves)."""
    if cfg.model_type == "mobilevlm":
        return {**text_dict, "model_type": "mobilevlm", "vision_config": vision_dict,
                "mm_projector_type": cfg.mm_projector_type, "mm_vision_select_layer": cfg.mm_vision_select_layer,
                "mm_vision_select_feature": cfg.mm_vision_select_feature, "image_aspect_ratio": "pad"}
    return {"model_type": "llava", "text_config": text_dict, "vision_config": vision_dict,
            "image_token_index": cfg.image_token_index, "projector_hidden_act": cfg.projector_hidden_act,
            "vision_feature_layer": cfg.vision_feature_layer,
            "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
            "tie_word_embeddings": cfg.tie_word_embeddings}


def _complete_tower(tower, tw: dict, vcfg, kind: str) -> dict:
    if kind == "dinov2":  # layer scale folded into the projections by pocketvlm's export, or absent
        for i in range(vcfg.num_hidden_layers):
            for s in (1, 2):
                tw.setdefault(f"encoder.layer.{i}.layer_scale{s}.lambda1", torch.ones(vcfg.hidden_size))
    for k, v in tower.state_dict().items():  # parts LLaVA's features never pass through: neutral values
        if k not in tw and k.startswith(_UNUSED):
            tw[k] = torch.ones_like(v) if k.endswith("norm.weight") else torch.zeros_like(v)
    return tw


def _join_llava(text, tower, reader, load, meta, layers, strategy, proj_kind, max_seq_len):
    from ..models import llava
    from ..models.projectors import build_projector
    from ..tokenizer import Tokenizer

    image_id = Tokenizer.from_gguf(text.gguf_metadata).token_to_id("<image>")
    cfg = llava.Config(
        model_type="llava", text_config=text.config, vision_config=tower.config,
        image_token_index=image_id if image_id is not None else -200,
        projector_hidden_act=meta.get("pocketvlm.projector.hidden_act", "gelu"),
        vision_feature_layer=layers if len(layers) > 1 else layers[0],
        vision_feature_select_strategy=strategy, tie_word_embeddings=text.config.tie_word_embeddings)
    model = meta_model(llava, cfg, max_seq_len)
    object.__setattr__(model, "_text", text.model)
    model.model.language_model = text.model.model
    model.lm_head = text.model.lm_head
    w = {f"linear_{1 if t.name.startswith('mm.0') else 2}.{t.name.rsplit('.', 1)[1]}": load(t)
         for t in reader.tensors if t.name.startswith(("mm.0.", "mm.2."))}
    proj = build_projector("mlp2x_gelu", w["linear_1.weight"].shape[1], w["linear_2.weight"].shape[0],
                           hidden_act=cfg.projector_hidden_act, bias=True)
    _load_strict(proj, w, reader.path)
    model.model.vision_tower = tower
    model.model.multi_modal_projector = proj
    return model, cfg, llava


def _join_mobilevlm(text, tower, reader, load, meta, layers, strategy, proj_kind, max_seq_len):
    from ..models import mobilevlm
    from ..models.projectors import build_projector

    if len(layers) != 1:
        raise UnsupportedArchitectureError(f"{reader.path}: MobileVLM takes one feature layer, the file names {layers}")
    cfg = mobilevlm.Config(model_type="mobilevlm", text_config=text.config, vision_config=tower.config,
                           mm_projector_type=proj_kind, mm_vision_select_layer=layers[0],
                           mm_vision_select_feature="patch" if strategy == "default" else "cls_patch",
                           tie_word_embeddings=text.config.tie_word_embeddings)
    proj = build_projector(proj_kind, tower.config.hidden_size, text.config.hidden_size)
    want = proj.state_dict()
    w = {}
    for t in reader.tensors:
        if t.name.startswith("mm."):
            k = t.name[3:]
            if proj_kind == "ldpv2":
                k = k.replace("model.mlp.", "mlp.mlp.").replace("model.peg.", "peg.peg.")
            if k not in want:
                raise UnsupportedArchitectureError(f"mmproj tensor {t.name!r} has no counterpart in pocketvlm's "
                                                   f"{proj_kind} projector")
            w[k] = load(t).reshape(want[k].shape)  # llama.cpp's converter squeezes the 1x1 convolutions
    _load_strict(proj, w, reader.path)
    model = meta_model(mobilevlm, cfg, max_seq_len)
    object.__setattr__(model, "_text", text.model)
    model.model = text.model.model
    model.model.vision_tower = torch.nn.Module()
    model.model.vision_tower.vision_tower = tower
    model.model.mm_projector = proj
    model.lm_head = text.model.lm_head
    return model, cfg, mobilevlm


def _vision_modules(model):
    if hasattr(model.model, "mm_projector"):
        return [model.model.vision_tower, model.model.mm_projector]
    return [model.model.vision_tower, model.model.multi_modal_projector]


def image_processor(resize: str, size: int, mean, std) -> dict:
    """Preprocessing settings for a square input of ``size``: "pad" (what llama.cpp does with any LLaVA mmproj:
    expand to square with the mean colour, then resize), "stretch" or "crop" (recorded by pocketvlm's export)."""
    d = {"image_mean": mean, "image_std": std, "resample": 3}
    if resize == "stretch":
        return {**d, "image_processor_type": "CLIPImageProcessor", "size": {"height": size, "width": size},
                "do_center_crop": False, "crop_size": None}
    kind = "LlavaImageProcessor" if resize == "pad" else "CLIPImageProcessor"
    return {**d, "image_processor_type": kind, "size": {"shortest_edge": size}, "do_center_crop": True,
            "crop_size": {"height": size, "width": size}, "do_pad": resize == "pad"}


def reader_shape(reader, name: str) -> tuple[int, ...]:
    """A tensor's shape in PyTorch's [out, in] order."""
    from ..quant.gguf_blocks import torch_shape

    for t in reader.tensors:
        if t.name == name:
            return tuple(torch_shape(t.shape))
    raise CorruptWeightsError(f"mmproj file has no {name} tensor (an MLP projector needs mm.0 and mm.2)")


def _load_strict(module, weights: dict, where) -> None:
    from .core import check_weights

    try:
        check_weights(module, None, {k: tuple(v.shape) for k, v in weights.items()})
    except CorruptWeightsError as e:
        raise CorruptWeightsError(f"{where}: mmproj tensors do not match pocketvlm's module: {e}") from None
    module.load_state_dict(weights, strict=True)
