"""A LLaVA's vision tower and projector as a llama.cpp ``mmproj`` GGUF (``clip.projector_type = "mlp"``).

Tensor names and keys follow llama.cpp's ``tools/mtmd`` (``v.*`` tower, ``mm.0``/``mm.2`` projector,
``clip.vision.*`` hyper-parameters, image mean/std). What llama.cpp's LLaVA graph does differently from
Hugging Face is settled here, exactly, so that the file computes what the pocketvlm model computes:

- the feature layers are written explicitly (``clip.vision.feature_layer``, Hugging Face hidden-state indices
  made non-negative), and only the layers they need are stored; the tower's final norm (CLIP/SigLIP
  ``post_layernorm``, DINOv2 ``layernorm``) is not, as LLaVA's features are taken before it;
- DINOv2's layer scale is folded into the attention output and ``fc2`` projections (llama.cpp's LLaVA graph
  has no layer-scale step): ``ls * (W x + b) = (ls * W) x + ls * b``;
- DINOv2's position embeddings are stored resampled to the model's own image size (as pocketvlm resamples
  them at run time), since llama.cpp adds them without interpolation;
- llama.cpp drops the class token (when the tower has one) and keeps every patch: ``"full"`` selection with a
  class token, or ``"default"`` without one, has no llama.cpp form and is refused.

``pocketvlm.*`` keys record what llama.cpp approximates (the exact GELU of the tower and projector), so that
pocketvlm reads its own files back exactly (:mod:`pocketvlm.loading.mmproj`).
"""
from __future__ import annotations

import torch

from ..errors import UnsupportedArchitectureError
from .gguf_text import add_tensor

# (suffix in the tower's state dict, llama.cpp suffix) per layer, CLIP/SigLIP names
_CLIP_LAYER = {
    "layer_norm1": "ln1", "layer_norm2": "ln2", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.out_proj": "attn_out", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}
_DINO_LAYER = {
    "norm1": "ln1", "norm2": "ln2", "attention.attention.query": "attn_q", "attention.attention.key": "attn_k",
    "attention.attention.value": "attn_v", "attention.output.dense": "attn_out", "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}
# the GELU llama.cpp runs: clip.use_gelu -> ggml_gelu (tanh form), else quick GELU
_USE_GELU = {"quick_gelu": False, "gelu": True, "gelu_pytorch_tanh": True, "gelu_new": True}


def positive_layers(layers, n_layers: int) -> list[int]:
    """Hugging Face hidden-state indices (0 = embeddings, -1 = last layer) made non-negative."""
    return [int(i) if i >= 0 else n_layers + 1 + int(i) for i in layers]


def projector_kind(model) -> str:
    """llama.cpp's ``clip.projector_type``: "mlp" (llava), "ldp" / "ldpv2" (mobilevlm)."""
    if model.config.model_type == "mobilevlm":
        from ..models.projectors import ALIASES

        return ALIASES.get(model.config.mm_projector_type, model.config.mm_projector_type)
    return "mlp"


def vision_tower(model):
    return model.model.vision_tower.vision_tower if model.config.model_type == "mobilevlm" else model.model.vision_tower


def check_llava(model) -> None:
    cfg = model.config
    vc = cfg.vision_config
    kind = projector_kind(model)
    if kind not in ("mlp", "ldp", "ldpv2"):
        raise UnsupportedArchitectureError(f"projector {kind!r} has no llama.cpp form (mlp, ldp, ldpv2 have)")
    if kind != "mlp" and vc.image_size // vc.patch_size != 24:
        raise UnsupportedArchitectureError(
            f"llama.cpp's {kind.upper()} graph assumes a 24x24 patch grid (CLIP ViT-L/14 at 336 px); this tower "
            f"gives {vc.image_size // vc.patch_size}x{vc.image_size // vc.patch_size}")
    has_cls = vc.model_type != "siglip_vision_model"
    if has_cls and cfg.vision_feature_select_strategy != "default":
        raise UnsupportedArchitectureError(
            f"{vc.model_type} tower with vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}: "
            "llama.cpp's LLaVA graph always drops the class token, so this model has no llama.cpp form")
    if not has_cls and cfg.vision_feature_select_strategy != "full":
        raise UnsupportedArchitectureError(
            "SigLIP tower with vision_feature_select_strategy 'default' (drops the first patch): llama.cpp's "
            "LLaVA graph keeps every patch of a tower without a class token, so this model has no llama.cpp form")
    if vc.hidden_act not in _USE_GELU:
        raise UnsupportedArchitectureError(f"vision activation {vc.hidden_act!r} has no llama.cpp form")
    if getattr(cfg, "projector_hidden_act", "gelu") not in ("gelu", "gelu_pytorch_tanh", "gelu_new"):
        raise UnsupportedArchitectureError(
            f"projector activation {cfg.projector_hidden_act!r}: llama.cpp's MLP projector runs GELU only")
    if getattr(vc, "use_swiglu_ffn", False):
        raise UnsupportedArchitectureError("DINOv2 with a SwiGLU MLP has no llama.cpp LLaVA form")


def input_size(model, proc) -> int:
    """The side of the square image the tower sees: the preprocessing's output (a DINOv2 tower resamples its
    position embeddings to it), which must be square."""
    h, w = proc.size if proc.size else (proc.crop_size if proc.do_center_crop else (None, None))
    if h is None or h != w:
        raise UnsupportedArchitectureError(
            f"the model's preprocessing does not give a fixed square image ({proc.size or proc.crop_size}): "
            "llama.cpp's LLaVA takes one square size")
    return int(h)


def tower_tensors(model, size: int) -> list[tuple[str, torch.Tensor]]:
    """(llama.cpp name, float tensor) of the tower's embeddings and the layers the features need, for square
    inputs of side ``size``."""
    cfg = model.config
    vc = cfg.vision_config
    tower = vision_tower(model)
    sd = {k: v.detach().float() for k, v in tower.state_dict().items()}
    needed = max(positive_layers(cfg.feature_layers, vc.num_hidden_layers))
    out: list[tuple[str, torch.Tensor]] = []
    if vc.model_type == "dinov2":
        e = "embeddings."
        out.append(("v.class_embd", sd[e + "cls_token"].reshape(-1)))
        out.append(("v.patch_embd.weight", sd[e + "patch_embeddings.projection.weight"]))
        out.append(("v.patch_embd.bias", sd[e + "patch_embeddings.projection.bias"]))
        side = size // vc.patch_size
        pos = tower.embeddings.position_embeddings.detach().float()[0]
        if pos.shape[0] != side * side + 1:
            from ..models.clip import interpolate_positions

            pos = torch.cat([pos[:1], interpolate_positions(pos[1:], side, side)])
        out.append(("v.position_embd.weight", pos))
        for i in range(needed):
            p = f"encoder.layer.{i}."
            w = {ours: (sd[p + ours + ".weight"], sd[p + ours + ".bias"]) for ours in _DINO_LAYER}
            ls1, ls2 = sd[p + "layer_scale1.lambda1"], sd[p + "layer_scale2.lambda1"]
            for ours, ls in (("attention.output.dense", ls1), ("mlp.fc2", ls2)):
                wt, b = w[ours]
                w[ours] = (wt * ls[:, None], b * ls)
            for ours, theirs in _DINO_LAYER.items():
                out.append((f"v.blk.{i}.{theirs}.weight", w[ours][0]))
                out.append((f"v.blk.{i}.{theirs}.bias", w[ours][1]))
        return out
    e = "vision_model.embeddings."
    if vc.model_type == "clip_vision_model":
        out.append(("v.class_embd", sd[e + "class_embedding"]))
    out.append(("v.patch_embd.weight", sd[e + "patch_embedding.weight"]))
    if e + "patch_embedding.bias" in sd:
        out.append(("v.patch_embd.bias", sd[e + "patch_embedding.bias"]))
    out.append(("v.position_embd.weight", sd[e + "position_embedding.weight"]))
    if "vision_model.pre_layrnorm.weight" in sd:
        out.append(("v.pre_ln.weight", sd["vision_model.pre_layrnorm.weight"]))
        out.append(("v.pre_ln.bias", sd["vision_model.pre_layrnorm.bias"]))
    for i in range(needed):
        p = f"vision_model.encoder.layers.{i}."
        for ours, theirs in _CLIP_LAYER.items():
            out.append((f"v.blk.{i}.{theirs}.weight", sd[p + ours + ".weight"]))
            out.append((f"v.blk.{i}.{theirs}.bias", sd[p + ours + ".bias"]))
    return out


def projector_tensors(model) -> list[tuple[str, torch.Tensor]]:
    kind = projector_kind(model)
    if kind != "mlp":  # MobileVLM's LDP / LDPv2 under the legacy converter's names, 1x1 convs as matrices
        out = []
        for k, v in model.model.mm_projector.state_dict().items():
            name = "mm." + (k if kind == "ldp" else k.replace("mlp.mlp.", "model.mlp.").replace("peg.peg.", "model.peg."))
            out.append((name, v.detach().float().squeeze()))
        return out
    proj = model.model.multi_modal_projector
    out = []
    for idx, lin in ((0, proj.linear_1), (2, proj.linear_2)):
        out.append((f"mm.{idx}.weight", lin.weight.detach().float()))
        out.append((f"mm.{idx}.bias", lin.bias.detach().float() if lin.bias is not None
                    else torch.zeros(lin.weight.shape[0])))
    return out


def resize_mode(proc) -> str:
    """How the model's own preprocessing fits an image to the square input: "stretch" (resize to the size),
    "crop" (short side, then centre crop), "pad" (LLaVA-1.5's expand to square). llama.cpp pads, whatever the
    file says; pocketvlm reads this key back so that its own files keep the model's preprocessing."""
    if proc.processor_class == "LlavaImageProcessor" and proc.do_pad:
        return "pad"
    return "crop" if proc.do_center_crop else "stretch"


def write_mmproj(path, model, image_processor, name: str, kind: str, progress=None) -> None:
    """Write ``model``'s (a pocketvlm ``llava`` model) tower and projector as an mmproj file at ``path``;
    ``progress.update(n)`` is called as tensors are prepared."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    check_llava(model)
    cfg = model.config
    vc = cfg.vision_config
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name(name)
    w.add_type("mmproj")
    w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}[kind])
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_llava_projector", True)
    w.add_string("clip.projector_type", projector_kind(model))
    w.add_bool("clip.use_gelu", _USE_GELU[vc.hidden_act])
    size = input_size(model, image_processor)
    w.add_uint32("clip.vision.image_size", size)
    w.add_uint32("clip.vision.patch_size", int(vc.patch_size))
    w.add_uint32("clip.vision.embedding_length", int(vc.hidden_size))
    w.add_uint32("clip.vision.feed_forward_length", int(vc.intermediate_size))
    w.add_uint32("clip.vision.projection_dim", int(cfg.text_config.hidden_size))
    layers = positive_layers(cfg.feature_layers, vc.num_hidden_layers)
    w.add_uint32("clip.vision.block_count", max(layers))
    w.add_uint32("clip.vision.attention.head_count", int(vc.num_attention_heads))
    w.add_float32("clip.vision.attention.layer_norm_epsilon", float(vc.layer_norm_eps))
    w.add_array("clip.vision.feature_layer", layers)
    w.add_array("clip.vision.image_mean", [float(x) for x in image_processor.image_mean])
    w.add_array("clip.vision.image_std", [float(x) for x in image_processor.image_std])
    # what llama.cpp approximates, so that pocketvlm reads its own file back exactly
    w.add_string("pocketvlm.vision.model_type", vc.model_type)
    w.add_string("pocketvlm.vision.hidden_act", vc.hidden_act)
    w.add_string("pocketvlm.projector.hidden_act", getattr(cfg, "projector_hidden_act", "gelu"))
    w.add_string("pocketvlm.image.resize", resize_mode(image_processor))
    for tname, t in tower_tensors(model, size) + projector_tensors(model):
        if tname == "v.patch_embd.weight":  # llama.cpp's converters store the conv kernel as f16
            add_tensor(w, tname, t, kind, qtype=Q.F32 if kind == "f32" else Q.F16)
        elif tname in ("v.position_embd.weight", "v.class_embd"):
            add_tensor(w, tname, t, kind, qtype=Q.F32)
        elif tname.startswith("mm.") and projector_kind(model) != "mlp":  # LDP: float, as llama.cpp's converter
            add_tensor(w, tname, t, kind, qtype=Q.F32 if t.dim() < 2 or kind == "f32" else Q.F16)
        else:
            add_tensor(w, tname, t, "f16" if kind == "q4_0" else kind)  # q4 towers lose too much: q4 files keep f16
        if progress is not None:
            progress.update(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
