"""A language model as a llama.cpp GGUF file: architecture keys, tokenizer and chat template in the metadata,
tensors under llama.cpp's names (the inverse of each family's ``GGUF_TENSORS`` table, so pocketvlm's own GGUF
loader reads the file back), in f32/f16/q8_0/q4_0 blocks written by the ``gguf`` package.

Key names and layout follow llama.cpp's ``convert_hf_to_gguf.py``: norms and biases stay float32, q/k rows of
the Llama architecture are permuted for llama.cpp's interleaved RoPE, a tied head has no ``output.weight``,
the vocabulary is padded with ``[PAD{id}]`` tokens to the embedding's rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, UnsupportedArchitectureError

# pocketvlm family -> (llama.cpp architecture, q/k rows permuted by llama.cpp's converter)
ARCHS = {"llama": ("llama", True), "qwen2": ("qwen2", False)}
TYPES = ("f32", "f16", "q8_0", "q4_0")


def arch_of(cfg) -> tuple[str, bool]:
    kind = cfg.model_type
    from ..models import registry

    fam = registry.FAMILIES.get(kind) or registry.ALIASES.get(kind)
    if fam not in ARCHS:
        raise UnsupportedArchitectureError(
            f"export to GGUF supports the {', '.join(sorted(ARCHS))} language models; {kind!r} has no GGUF writer "
            "in pocketvlm yet")
    return ARCHS[fam]


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

    arch, permuted = arch_of(cfg)
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
        if permuted and ".self_attn.q_proj." in hf:
            t = permute_qk(t, cfg.num_attention_heads)
        elif permuted and ".self_attn.k_proj." in hf:
            t = permute_qk(t, cfg.n_kv_heads)
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

    arch, _ = arch_of(cfg)
    writer.add_name(name)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(int(cfg.num_attention_heads))
    writer.add_head_count_kv(int(cfg.n_kv_heads))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_freq_base(float(cfg.rope.get("rope_theta", 10000.0)))
    if cfg.dim_head != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(int(cfg.dim_head))
        writer.add_value_length(int(cfg.dim_head))
    writer.add_rope_dimension_count(int(cfg.dim_head))
    writer.add_vocab_size(int(cfg.vocab_size))
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind]
    writer.add_file_type(ftype)
    rope_type = (cfg.rope or {}).get("rope_type", "default")
    if rope_type not in ("default", None):
        raise UnsupportedArchitectureError(f"RoPE scaling {rope_type!r} is not exported to GGUF yet")


# --- tokenizer -------------------------------------------------------------------------------------

_GGUF_TOKEN = {"normal": 1, "unknown": 2, "control": 3, "user_defined": 4, "unused": 5, "byte": 6}


def copy_tokenizer_metadata(writer, meta: dict) -> None:
    """A GGUF source's own tokenizer keys, as they are."""
    for key, value in meta.items():
        if not key.startswith("tokenizer."):
            continue
        if isinstance(value, np.ndarray):
            value = value.tolist()
        _add_any(writer, key, value)


def _add_any(writer, key: str, value) -> None:
    import gguf

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        sub = gguf.GGUFValueType.STRING if value and isinstance(value[0], str) else None
        if value and isinstance(value[0], float):
            sub = gguf.GGUFValueType.FLOAT32
        elif value and isinstance(value[0], int):
            sub = gguf.GGUFValueType.INT32
        writer.add_array(key, list(value)) if sub is None else writer.add_key_value(
            key, list(value), gguf.GGUFValueType.ARRAY, sub_type=sub)
    else:
        raise ConfigError(f"cannot write metadata {key!r} of type {type(value).__name__}")


def write_folder_tokenizer(writer, folder: Path, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE vocabularies (Qwen2, Llama 3, GPT-2 style) from a Hugging Face ``tokenizer.json``."""
    from ..tokenizer import _PRE_SPLITS

    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        raise ConfigError(f"{folder} has no tokenizer.json: the GGUF export writes byte-level BPE vocabularies "
                          "from it (a sentencepiece tokenizer.model is not supported yet)")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UnsupportedArchitectureError(
            "GGUF export writes byte-level BPE tokenizers (Qwen2, Llama 3, GPT-2 style); this tokenizer is "
            f"{model.get('type')!r}{' with byte fallback (sentencepiece style)' if model.get('byte_fallback') else ''}")
    pre = _pre_name(tj.get("pre_tokenizer") or {}, _PRE_SPLITS)
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: _GGUF_TOKEN["normal"] for i in tokens}
    for added in tj.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = _GGUF_TOKEN["control"] if added.get("special") else _GGUF_TOKEN["user_defined"]
    n = max(vocab_size, max(tokens) + 1)
    token_list = [tokens.get(i, f"[PAD{i}]") for i in range(n)]
    type_list = [types.get(i, _GGUF_TOKEN["unused"]) for i in range(n)]
    merges = model.get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(token_list)
    writer.add_token_types(type_list)
    writer.add_token_merges(merges)
    for setter, tid in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                        (writer.add_eos_token_id, tokenizer.eos_token_id),
                        (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if tid is not None:
            setter(int(tid))
    writer.add_add_bos_token(bool(tokenizer.add_bos_token))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _pre_name(pre: dict, splits: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a ``tokenizer.json`` pre-tokenizer: GPT-2's regex inside
    ByteLevel, or a known Split regex followed by a regex-free ByteLevel."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    seq = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if seq and len(seq) == 2 and seq[0].get("type") == "Split" and seq[1].get("type") == "ByteLevel":
        regex = (seq[0].get("pattern") or {}).get("Regex")
        for name in ("qwen2", "llama-bpe", "gpt-4o", "tekken", "qwen35"):
            if splits.get(name) == regex:
                return name
    raise UnsupportedArchitectureError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}...) matches none of the llama.cpp pre-tokenizer "
        "types pocketvlm knows (gpt-2, qwen2, llama-bpe, gpt-4o, tekken, qwen35)")
