"""A model's vocabulary as llama.cpp's ``tokenizer.*`` GGUF metadata.

Three sources, read as llama.cpp's ``convert_hf_to_gguf.py`` reads them:

- a GGUF source: its own tokenizer keys, carried over as they are (:func:`copy_tokenizer_metadata`);
- byte-level BPE (Qwen2, Llama 3, GPT-2 style ``tokenizer.json``): ``tokenizer.ggml.model = "gpt2"`` with merges
  and the pre-tokenizer's llama.cpp name;
- sentencepiece style (Gemma, Phi-3, Llama 2): ``tokenizer.ggml.model = "llama"`` with tokens, scores and token
  types. From ``tokenizer.model`` when the folder has one (pieces, scores and types of the sentencepiece
  model, then the added tokens of ``added_tokens.json``, ``tokenizer_config.json`` and ``tokenizer.json``);
  else from a ``tokenizer.json`` BPE with byte fallback, whose merge order becomes the scores llama.cpp merges
  by (a token's score: minus the rank of the first merge that makes it).

Byte-fallback tokens ``<0xNN>`` are BYTE, special added tokens (and those that look special to llama.cpp's
converter) CONTROL, other added tokens USER_DEFINED; ids past the vocabulary up to the embedding's rows are
``[PAD{id}]`` tokens of type UNUSED.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..errors import ConfigError, UnsupportedArchitectureError

# gguf.TokenType, which is also sentencepiece's ModelProto.SentencePiece.Type numbering
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


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


def write_folder_tokenizer(writer, folder: Path, tokenizer, vocab_size: int, arch: str) -> None:
    """The vocabulary of a Hugging Face folder: byte-level BPE or sentencepiece style, whichever it is."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    tj = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    model = tj.get("model", {})
    if (folder / "tokenizer.model").exists():
        tokens, scores, types, prefix = _spm_file_vocab(folder, tj)
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        tokens, scores, types, prefix = _bpe_fallback_vocab(tj)
    elif model.get("type") == "BPE":
        _write_byte_level(writer, tj, tokenizer, vocab_size)
        _write_specials(writer, tokenizer)
        return
    elif not tj:
        raise ConfigError(f"{folder} has neither tokenizer.json nor tokenizer.model: the GGUF export writes the "
                          "vocabulary from one of them")
    else:
        raise UnsupportedArchitectureError(
            f"GGUF export writes byte-level BPE and sentencepiece-style vocabularies; this tokenizer.json is a "
            f"{model.get('type')!r} model")
    n = max(vocab_size, len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens + [f"[PAD{i}]" for i in range(len(tokens), n)])
    writer.add_token_scores(scores + [-1000.0] * (n - len(tokens)))
    writer.add_token_types(types + [UNUSED] * (n - len(tokens)))
    # llama.cpp's Gemma converters say "no space prefix" whatever the sentencepiece model says
    writer.add_add_space_prefix(bool(prefix) and not arch.startswith("gemma"))
    _write_specials(writer, tokenizer)


def _write_specials(writer, tokenizer) -> None:
    for setter, tid in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                        (writer.add_eos_token_id, tokenizer.eos_token_id),
                        (writer.add_unk_token_id, _id(tokenizer, tokenizer.unk_token)),
                        (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if tid is not None:
            setter(int(tid))
    writer.add_add_bos_token(bool(tokenizer.add_bos_token))
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _id(tokenizer, token: str | None) -> int | None:
    return tokenizer.token_to_id(token) if token else None


def looks_special(token: str) -> bool:
    """Added tokens llama.cpp's converter makes CONTROL even where the tokenizer does not call them special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<unused") and token.endswith(">")))


# --- sentencepiece style -------------------------------------------------------------------------------

def _spm_file_vocab(folder: Path, tj: dict) -> tuple[list[str], list[float], list[int], bool]:
    """Tokens, scores and types of ``tokenizer.model`` (the sentencepiece model's own types), with the added
    tokens of the folder's JSON files on top; and whether the model adds a dummy space prefix."""
    pieces, prefix = read_sentencepiece(folder / "tokenizer.model")
    tokens = [p for p, _, _ in pieces]
    scores = [s for _, s, _ in pieces]
    types = [t for _, _, t in pieces]
    added: dict[int, tuple[str, bool]] = {}
    if (folder / "added_tokens.json").exists():
        for content, i in json.loads((folder / "added_tokens.json").read_text(encoding="utf-8")).items():
            added[int(i)] = (content, False)
    if (folder / "tokenizer_config.json").exists():
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        for i, spec in (cfg.get("added_tokens_decoder") or {}).items():
            added[int(i)] = (spec["content"], bool(spec.get("special")))
    for spec in tj.get("added_tokens", []):
        added[int(spec["id"])] = (spec["content"], bool(spec.get("special")))
    for i, (content, special) in sorted(added.items()):
        if i >= len(tokens):  # past the sentencepiece model: [PAD] fills the gap, as llama.cpp's converter does
            tokens += [f"[PAD{j}]" for j in range(len(tokens), i + 1)]
            scores += [-1000.0] * (i + 1 - len(scores))
            types += [UNUSED] * (i + 1 - len(types))
        control = special or looks_special(content)
        tokens[i] = content if control else content.replace("\u2581", " ")
        scores[i] = -1000.0
        types[i] = CONTROL if control else USER_DEFINED
    return tokens, scores, types, prefix


def read_sentencepiece(path: Path) -> tuple[list[tuple[str, float, int]], bool]:
    """(piece, score, type) of every piece of a sentencepiece ``tokenizer.model``, and its normalizer's
    ``add_dummy_prefix``: the few fields of its protobuf that a GGUF vocabulary needs, read directly (the
    ``sentencepiece`` package is not needed)."""
    data = Path(path).read_bytes()
    pieces, prefix = [], True
    try:
        for field, value in _proto_fields(data):
            if field == 1:  # ModelProto.pieces: SentencePiece {1: piece, 2: score, 3: type}
                piece, score, kind = "", 0.0, NORMAL
                for f, v in _proto_fields(value):
                    if f == 1:
                        piece = v.decode("utf-8")
                    elif f == 2:
                        score = float(np.frombuffer(v, "<f4")[0])
                    elif f == 3:
                        kind = int(v)
                pieces.append((piece, score, kind))
            elif field == 3:  # ModelProto.normalizer_spec: {3: add_dummy_prefix}
                for f, v in _proto_fields(value):
                    if f == 3:
                        prefix = bool(v)
    except (IndexError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path} is not a sentencepiece model ({e})") from e
    if not pieces:
        raise ConfigError(f"{path} is not a sentencepiece model (no pieces)")
    return pieces, prefix


def _proto_fields(buf: bytes):
    """(field number, value) of a protobuf message: varints as int, 32-bit values as 4 bytes, length-delimited
    values as bytes."""
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > n:
            raise ValueError("truncated")
        yield field, value


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, pos
        shift += 7


def _bpe_fallback_vocab(tj: dict) -> tuple[list[str], list[float], list[int], bool]:
    """Tokens, scores and types of a sentencepiece-style ``tokenizer.json`` (BPE with byte fallback).

    llama.cpp's sentencepiece tokenizer merges the adjacent pair whose joined token scores highest, so the
    score of a token is minus the rank of the first merge making it (the merges' order, as Hugging Face's BPE
    applies it); tokens no merge makes score below every merge. The dummy prefix: a ``Metaspace``
    pre-tokenizer that prepends, or a normalizer that prepends "▁"."""
    model = tj["model"]
    vocab: dict[str, int] = model["vocab"]
    n = max([*vocab.values(), *(a["id"] for a in tj.get("added_tokens", []))]) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = BYTE if _BYTE_TOKEN.fullmatch(t) else NORMAL
    rank: dict[str, int] = {}
    for r, m in enumerate(model.get("merges") or []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    floor = -float(len(rank) + 1)
    scores = [-float(rank[t]) if t in rank else (0.0 if len(t) == 1 or types[i] == BYTE else floor)
              for i, t in enumerate(tokens)]
    if model.get("unk_token") in vocab:
        types[vocab[model["unk_token"]]] = UNKNOWN
    for a in tj.get("added_tokens", []):
        control = a.get("special") or looks_special(a["content"])
        tokens[a["id"]] = a["content"]
        types[a["id"]] = CONTROL if control else USER_DEFINED
        scores[a["id"]] = -1000.0
    pre, norm = tj.get("pre_tokenizer") or {}, tj.get("normalizer") or {}
    steps = [pre, *(pre.get("pretokenizers") or [])]
    prefix = any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never" for s in steps)
    nsteps = [norm, *(norm.get("normalizers") or [])]
    prefix = prefix or any(s.get("type") == "Prepend" and s.get("prepend") == "\u2581" for s in nsteps)
    return tokens, scores, types, prefix


# --- byte-level BPE ------------------------------------------------------------------------------------

def _write_byte_level(writer, tj: dict, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE vocabularies (Qwen2, Llama 3, GPT-2 style) from a Hugging Face ``tokenizer.json``."""
    from ..tokenizer import _PRE_SPLITS

    model = tj["model"]
    pre = _pre_name(tj.get("pre_tokenizer") or {}, _PRE_SPLITS)
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: NORMAL for i in tokens}
    for added in tj.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    n = max(vocab_size, max(tokens) + 1)
    merges = model.get("merges") or []
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([tokens.get(i, f"[PAD{i}]") for i in range(n)])
    writer.add_token_types([types.get(i, UNUSED) for i in range(n)])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])


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
