"""A language model as a llama.cpp GGUF file: architecture keys and chat template in the metadata (the
vocabulary: :mod:`.gguf_vocab`), tensors under llama.cpp's names (the inverse of each family's
``GGUF_TENSORS`` table, so pocketvlm's own GGUF loader reads the file back), in f32/f16/q8_0/q4_0 blocks written
by the ``gguf`` package.

Key names and layout follow llama.cpp's ``convert_hf_to_gguf.py``: norms and biases stay float32, q/k rows of
the Llama architecture are permuted for llama.cpp's interleaved RoPE, a tied head has no ``output.weight``,
the vocabulary is padded with ``[PAD{id}]`` tokens to the embedding's rows. Gemma (1, 2, 3): every
``*norm.weight`` stored as ``1 + weight``, the soft-capping and sliding-window keys, the sliding layers as one
flag per layer, Gemma 3's local RoPE base. Phi-3: the fused ``attn_qkv`` / ``ffn_up`` (gate and up) tensors
as Hugging Face stores them, the rotated part of each head and the original context length. What llama.cpp's
graph cannot express is refused before anything is written (:func:`check_exportable`).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import ConfigError, UnsupportedArchitectureError

# pocketvlm family -> llama.cpp architecture
ARCHS = {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3",
         "phi3": "phi3"}
#: families whose q/k rows llama.cpp's converter permutes; whose norms it stores as 1 + weight
PERMUTED = ("llama",)
GEMMA = ("gemma", "gemma2", "gemma3")
TYPES = ("f32", "f16", "q8_0", "q4_0")
# llama.cpp's Gemma 2/3 scale queries by 1/sqrt(hidden / heads) on the 27B models (told by their layer count),
# by 1/sqrt(head_dim) otherwise: GGUF has no key for query_pre_attn_scalar
_SCALE_BY_HIDDEN_BLOCKS = {"gemma2": 46, "gemma3": 62}


def family_of(cfg) -> str:
    from ..models import registry

    kind = cfg.model_type
    return registry.FAMILIES.get(kind) or registry.ALIASES.get(kind) or kind


def arch_of(cfg) -> str:
    fam = family_of(cfg)
    if fam not in ARCHS:
        raise UnsupportedArchitectureError(
            f"export to GGUF supports the {', '.join(sorted(ARCHS))} language models; {cfg.model_type!r} has no "
            "GGUF writer in pocketvlm yet")
    return ARCHS[fam]


def check_exportable(cfg) -> str:
    """The llama.cpp architecture of ``cfg``, or UnsupportedArchitectureError naming what llama.cpp's graph for
    it cannot run (checked before anything is written)."""
    arch = arch_of(cfg)
    rope = dict(cfg.rope or {})
    rope_type = rope.get("rope_type", "default") or "default"
    if rope_type not in ("default", "linear") or (rope_type == "linear" and arch != "gemma3"):
        raise UnsupportedArchitectureError(
            f"RoPE scaling {rope_type!r} of this {cfg.model_type} model is not exported to GGUF yet"
            + (" (Phi-3 LongRoPE: the 128k-context models)" if rope_type == "longrope" else ""))
    if arch in ("gemma", "gemma2") and not cfg.tie_word_embeddings:
        raise UnsupportedArchitectureError(
            f"llama.cpp's {arch} graph uses the token embeddings as the output head; this model has its own "
            "lm_head (tie_word_embeddings=False), which a GGUF file for it cannot carry")
    if arch in ("gemma2", "gemma3"):
        blocks = _SCALE_BY_HIDDEN_BLOCKS[arch]
        want = cfg.hidden_size // cfg.num_attention_heads if cfg.num_hidden_layers == blocks else cfg.dim_head
        if float(cfg.query_pre_attn_scalar) != float(want):
            raise UnsupportedArchitectureError(
                f"query_pre_attn_scalar={cfg.query_pre_attn_scalar}: llama.cpp's {arch} graph scales queries by "
                f"1/sqrt({want}) for a model of this shape (GGUF has no key for the scalar)")
    if arch == "gemma2" and (cfg.attn_logit_softcapping is None or cfg.final_logit_softcapping is None):
        raise UnsupportedArchitectureError(
            "llama.cpp's gemma2 graph always soft-caps attention scores and logits; this model has "
            f"attn_logit_softcapping={cfg.attn_logit_softcapping}, final_logit_softcapping="
            f"{cfg.final_logit_softcapping}")
    return arch


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's interleaved-RoPE row order (the inverse of :func:`pocketvlm.models.llama.unpermute_qk`)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tensor_type(name: str, shape: tuple, kind: str):
    """The GGUF type of one tensor at export type ``kind``: 1-D tensors stay f32 (as llama.cpp's converters
    write them); rows whose length is not a multiple of the 32-value block fall back to f16."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) < 2 or kind == "f32":
        return Q.F32
    if kind == "f16" or shape[-1] % 32:
        return Q.F16
    return {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[kind]


def add_tensor(writer, name: str, t: torch.Tensor, kind: str, qtype=None) -> None:
    from gguf import GGMLQuantizationType as Q, quants

    a = t.detach().to(torch.float32).cpu().numpy()
    qtype = qtype if qtype is not None else tensor_type(name, a.shape, kind)
    if qtype == Q.F32:
        writer.add_tensor(name, np.ascontiguousarray(a))
    elif qtype == Q.F16:
        writer.add_tensor(name, a.astype(np.float16))
    else:
        writer.add_tensor(name, quants.quantize(a, qtype), raw_dtype=qtype)


def text_tensors(text_model, cfg) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, float tensor) for every weight of a text model (a family ``Model``), in llama.cpp's order."""
    from ..models import registry

    arch = check_exportable(cfg)
    family = family_of(cfg)
    fam = registry.family(cfg.model_type)
    inverse = {h: g for g, h in fam.GGUF_TENSORS.items()}
    state = {k: v for k, v in text_model.state_dict(keep_vars=False).items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    out = []
    for hf, t in state.items():
        if hf.endswith(("rotary_emb.inv_freq",)) or not t.is_floating_point():
            continue
        if hf.startswith(("model.vision_tower.", "model.mm_projector.")):
            continue  # MobileVLM hangs its tower and projector under the decoder's "model": the mmproj file's
        layer = None
        key = hf
        parts = hf.split(".")
        if len(parts) > 3 and parts[1] == "layers" and parts[2].isdigit():
            layer = parts[2]
            key = ".".join(parts[:2] + ["{i}"] + parts[3:])
        g = inverse.get(key)
        if g is None:
            raise ConfigError(f"weight {hf} has no llama.cpp name for architecture {arch!r}")
        if family in PERMUTED and ".self_attn.q_proj." in hf:
            t = permute_qk(t, cfg.num_attention_heads)
        elif family in PERMUTED and ".self_attn.k_proj." in hf:
            t = permute_qk(t, cfg.n_kv_heads)
        elif family in GEMMA and hf.endswith("norm.weight"):
            t = t.float() + 1.0  # Gemma's RMSNorm scales by 1 + weight; llama.cpp's by the weight
        out.append((g.replace("{i}", layer) if layer is not None else g, t))
    order = {g: i for i, g in enumerate(fam.GGUF_TENSORS)}

    def rank(item):
        name = item[0]
        p = name.split(".")
        if p[0] == "blk":
            return (1, int(p[1]), order.get("blk.{i}." + ".".join(p[2:]), 0))
        return (0 if name.startswith("token_embd") else 2, 0, order.get(name, 0))
    return sorted(out, key=rank)


def write_text_metadata(writer, cfg, name: str, kind: str) -> None:
    import gguf

    arch = check_exportable(cfg)
    writer.add_name(name)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(int(cfg.num_attention_heads))
    writer.add_head_count_kv(int(cfg.n_kv_heads))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_freq_base(float(cfg.rope.get("rope_theta", 10000.0)))
    if cfg.dim_head != cfg.hidden_size // cfg.num_attention_heads or arch in GEMMA:
        writer.add_key_length(int(cfg.dim_head))
        writer.add_value_length(int(cfg.dim_head))
    rotated = int(cfg.dim_head * float((cfg.rope or {}).get("partial_rotary_factor", 1.0)))
    writer.add_rope_dimension_count(rotated)
    writer.add_vocab_size(int(cfg.vocab_size))
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind]
    writer.add_file_type(ftype)
    if arch in ("gemma2", "gemma3"):
        _write_gemma_attention(writer, cfg, arch)
    elif arch == "phi3":
        _write_phi3(writer, cfg)


def _write_gemma_attention(writer, cfg, arch: str) -> None:
    """Gemma 2/3: soft-capping, the window and which layers slide (one flag per layer, so that llama.cpp's
    default pattern, one global layer in 2 or 6, never has to match), Gemma 3's local RoPE base and the global
    layers' linear RoPE scaling."""
    import gguf

    sliding = [cfg.layer_type(i) == "sliding_attention" for i in range(cfg.num_hidden_layers)]
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))
        writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    elif cfg.final_logit_softcapping:
        writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    window = int(cfg.sliding_window or 0) if any(sliding) else 0
    writer.add_sliding_window(window)
    if window:
        writer.add_array(f"{arch}.attention.sliding_window_pattern", sliding)
    if arch == "gemma3":
        writer.add_rope_freq_base_swa(float(cfg.rope_local.get("rope_theta", 10000.0)))
        if (cfg.rope or {}).get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(cfg.rope["factor"]))


def _write_phi3(writer, cfg) -> None:
    """Phi-3: the original context length and the window (0 for none, as llama.cpp's converter writes it).
    llama.cpp runs Phi-3 without its sliding window (it disables SWA for the architecture): past the window the
    two engines differ, which is said here rather than hidden."""
    writer.add_rope_scaling_orig_ctx_len(int((cfg.rope or {}).get("original_max_position_embeddings",
                                                                   cfg.max_position_embeddings)))
    window = int(cfg.sliding_window or 0)
    writer.add_sliding_window(window)
    if window and window < cfg.max_position_embeddings:
        warnings.warn(f"Phi-3 sliding_window={window}: llama.cpp ignores it (its phi3 graph disables sliding-window "
                      f"attention), so past {window} tokens llama.cpp attends further back than pocketvlm",
                      stacklevel=3)
