"""Text tokenization for pocketvlm, on top of the ``tokenizers`` library (never ``transformers``).

Stable API (other modules rely on it)::

    tok = Tokenizer.from_folder("path/to/hf_checkpoint")     # tokenizer.json + configs
    tok = Tokenizer.from_gguf("model.gguf")                   # or a gguf.GGUFReader
    ids = tok.encode("Hello", add_special_tokens=True)        # BOS added when the tokenizer says so
    text = tok.decode(ids, skip_special_tokens=False)
    tok.bos_token_id, tok.bos_token, tok.eos_token, tok.eos_token_ids (a set), tok.pad_token_id,
    tok.vocab_size, tok.token_to_id(str) -> int | None, tok.id_to_token(int),
    tok.chat_template (str | None), tok.chat_templates (dict name -> str), tok.add_bos_token,
    tok.is_special(id) -> bool

    dec = StreamDecoder(tok, skip_special_tokens=False)
    for tid in generated: print(dec.push(tid), end="")         # never emits half a character
    print(dec.flush())

GGUF files carry no ``tokenizer.json``; :meth:`Tokenizer.from_gguf` rebuilds one from the
``tokenizer.ggml.*`` metadata so that it encodes exactly as ``transformers`` does for the same file
(``AutoTokenizer.from_pretrained(folder, gguf_file=name)``):

* ``gpt2`` (byte-level BPE, e.g. Qwen2): vocabulary respelled into the GPT-2 byte alphabet, the file's
  merges, the split regex named by ``tokenizer.ggml.pre`` followed by a regex-free ByteLevel step.
* ``llama`` (SentencePiece-style BPE with byte fallback): merges rebuilt from the token scores,
  ``Metaspace`` with a prefix space on the first word only. Gemma files (architecture gemma/2/3) use
  spaces-to-"▁" normalization and merges ordered by token position instead of score, because
  Gemma's scores do not follow its merge order. Phi-3 prepends "▁" in the normalizer.

Tokens the file marks CONTROL become special added tokens (matched whole in text, dropped by
``skip_special_tokens``); USER_DEFINED ones become plain added tokens.

``eos_token_ids`` = the eos id, plus ``generation_config.json``'s ``eos_token_id`` (folders), plus
``tokenizer.ggml.eot_token_id`` / ``eom_token_id`` (GGUF), plus any special token with a well-known
end-of-turn spelling (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``, ``<|end|>``) that the
tokenizer's own chat template writes. Templates chosen elsewhere: see
``pocketvlm.chat.stop_token_ids``.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from .errors import ConfigError, ModelNotFoundError, UnsupportedArchitectureError

__all__ = ["Tokenizer", "StreamDecoder", "END_OF_TURN_TOKENS"]

# Spellings chat templates use to end a turn; stopping there is what every chat runtime does.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|eom_id|>", "<turn|>")

# llama.cpp token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4

# Split regexes by `tokenizer.ggml.pre`: each vocabulary was trained on text cut this way.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "megrez", "f2llmv2"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "lfm2", "dbrx", "smaug-bpe",
         "midm-2.0", "jina-v5-nano"),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "minimax-m2", "talkie"), _GPT4O_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


# ---------------------------------------------------------------------------------------------
# Building a backend from GGUF metadata
# ---------------------------------------------------------------------------------------------
def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every way to cut a token into two
    vocabulary pieces, best-scored token first, then longer left piece, then longer right piece,
    ties in token order. This is the ordering transformers' converter produces, so both tokenizers
    merge in the same order. (Its extra per-token sort by piece ids never decides anything: the
    cuts of one token all differ in left length.)"""
    lefts, rights, keys_score, keys_left, keys_right, keys_order = [], [], [], [], [], []
    for order, (token, score) in enumerate(scores.items()):
        n = len(token)
        for i in range(1, n):
            left = token[:i]
            if left in vocab:
                right = token[i:]
                if right in vocab:
                    lefts.append(left)
                    rights.append(right)
                    keys_score.append(score)
                    keys_left.append(i)
                    keys_right.append(n - i)
                    keys_order.append(order)
    if not lefts:
        return []
    # np.lexsort is stable and sorts by the last key first.
    perm = np.lexsort((np.asarray(keys_order), -np.asarray(keys_right), -np.asarray(keys_left),
                       -np.asarray(keys_score, dtype=np.float64)))
    return [(lefts[k], rights[k]) for k in perm.tolist()]


def _spm_backend(tokens: list[str], scores, style: str) -> _Backend:
    """SentencePiece-style BPE with byte fallback. style: "llama" | "gemma" | "phi3"."""
    if style == "gemma":
        # Gemma stores multi-space tokens with real spaces; the normalizer produces "▁" runs.
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        order = {t: -i for i, t in enumerate(tokens)}  # Gemma merges follow file order, not scores
    else:
        if scores is None:
            raise ConfigError("GGUF sentencepiece vocabulary has no tokenizer.ggml.scores; the file is incomplete")
        order = dict(zip(tokens, (float(s) for s in scores)))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges_from_scores(vocab, order)
    if style == "gemma":
        unk = "<unk>" if "<unk>" in vocab else None
        backend = _Backend(BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk, byte_fallback=True, dropout=None))
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        return backend
    backend = _Backend(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    if style == "phi3":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        backend.pre_tokenizer = None
    else:
        backend.normalizer = None
        # The prefix space goes before the first word only (SentencePiece's non-legacy behaviour).
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return backend


def _byte_level_backend(tokens: list[str], merges: list[str] | None, pre: str | None) -> _Backend:
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    if merges is None:
        raise ConfigError("GGUF byte-level (gpt2) vocabulary has no tokenizer.ggml.merges; the file is incomplete")
    pairs = [tuple(m.split(" ")) for m in merges]
    backend = _Backend(
        BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    split = _PRE_SPLITS.get(pre or "")
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:  # GPT-2's own regex
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _token_str(tok) -> str | None:
    """A special token from a tokenizer_config value: str, AddedToken dict, or None."""
    if tok is None:
        return None
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or re-download it") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------
class Tokenizer:
    """A ``tokenizers`` backend plus the special-token facts chat and generation need."""

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        chat_template: str | dict[str, str] | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ):
        self._backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        # Named special tokens missing from the added vocabulary get added (as transformers does),
        # so they are matched whole in text.
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in (bos_token, eos_token, unk_token, pad_token) if t and t not in added]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])
        # An explicit add_bos/add_eos (or no post-processor at all) means: rebuild the post-processor.
        if add_bos_token is not None or add_eos_token is not None or backend.post_processor is None:
            add_bos = bool(add_bos_token) and self.bos_token_id is not None
            add_eos = bool(add_eos_token) and self.eos_token_id is not None
            single = (f"{bos_token}:0 " if add_bos else "") + "$A:0" + (f" {eos_token}:0" if add_eos else "")
            pair = single + (f" {bos_token}:1" if add_bos else "") + " $B:1" + (f" {eos_token}:1" if add_eos else "")
            specials = ([(bos_token, self.bos_token_id)] if add_bos else []) + (
                [(eos_token, self.eos_token_id)] if add_eos else [])
            backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        if isinstance(chat_template, dict):
            self.chat_templates = dict(chat_template)
            self.chat_template = self.chat_templates.get("default")
        else:
            self.chat_templates = {"default": chat_template} if chat_template else {}
            self.chat_template = chat_template or None
        self._special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.special_strings = tuple(sorted({t.content for t in backend.get_added_tokens_decoder().values()
                                             if t.special and t.content}, key=len, reverse=True))
        self._as_text = None  # a copy of the backend that reads special-token strings as plain text
        eos = set(int(i) for i in extra_eos_token_ids)
        if self.eos_token_id is not None:
            eos.add(self.eos_token_id)
        for name in END_OF_TURN_TOKENS:
            tid = self.token_to_id(name)
            if tid is not None and tid in self._special_ids and any(name in t for t in self.chat_templates.values()):
                eos.add(tid)
        self.eos_token_ids: set[int] = eos

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a Hugging Face tokenizer folder (``tokenizer.json`` is required)."""
        folder = Path(path)
        if not folder.is_dir():
            raise ModelNotFoundError(f"tokenizer folder not found: {folder}; pass a folder holding tokenizer.json")
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise ModelNotFoundError(
                f"{folder} has no tokenizer.json; pocketvlm needs the fast-tokenizer file "
                "(convert a sentencepiece-only checkpoint with transformers' save_pretrained first)"
            )
        try:
            backend = _Backend.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ConfigError(f"{tj} cannot be parsed by the tokenizers library ({e}); re-download it") from e
        cfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        smap = _read_json(folder / "special_tokens_map.json") if (folder / "special_tokens_map.json").is_file() else {}

        def special(name):
            return _token_str(cfg.get(name)) if cfg.get(name) is not None else _token_str(smap.get(name))

        # added_tokens_decoder entries that tokenizer.json lacks
        have = {t.content for t in backend.get_added_tokens_decoder().values()}
        extra = []
        for _, spec in sorted((cfg.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
            if isinstance(spec, dict) and spec.get("content") and spec["content"] not in have:
                extra.append(AddedToken(
                    spec["content"], single_word=spec.get("single_word", False), lstrip=spec.get("lstrip", False),
                    rstrip=spec.get("rstrip", False), normalized=spec.get("normalized", not spec.get("special", False)),
                    special=spec.get("special", False)))
        if extra:
            backend.add_tokens(extra)

        templates: dict[str, str] = {}
        ct = cfg.get("chat_template")
        if isinstance(ct, str):
            templates["default"] = ct
        elif isinstance(ct, list):
            for entry in ct:
                if not (isinstance(entry, dict) and "name" in entry and "template" in entry):
                    raise ConfigError(f"{folder}/tokenizer_config.json: chat_template list entries need 'name' and 'template'")
                templates[entry["name"]] = entry["template"]
        elif ct is not None:
            raise ConfigError(f"{folder}/tokenizer_config.json: chat_template must be a string or a list, got {type(ct).__name__}")
        if (folder / "chat_template.json").is_file():
            ctj = _read_json(folder / "chat_template.json").get("chat_template")
            if isinstance(ctj, str):
                templates["default"] = ctj
        if (folder / "chat_template.jinja").is_file():
            templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        extra_dir = folder / "additional_chat_templates"
        if extra_dir.is_dir():
            for p in sorted(extra_dir.glob("*.jinja")):
                templates[p.stem] = p.read_text(encoding="utf-8")

        eos_extra: list[int] = []
        gc = folder / "generation_config.json"
        if gc.is_file():
            e = _read_json(gc).get("eos_token_id")
            eos_extra = [e] if isinstance(e, int) else [int(x) for x in (e or [])]
        return cls(
            backend,
            bos_token=special("bos_token"), eos_token=special("eos_token"),
            pad_token=special("pad_token"), unk_token=special("unk_token"),
            add_bos_token=cfg.get("add_bos_token"), add_eos_token=cfg.get("add_eos_token"),
            chat_template=templates or None, extra_eos_token_ids=eos_extra,
        )

    @classmethod
    def from_gguf(cls, reader_or_path) -> "Tokenizer":
        """Rebuild the tokenizer a GGUF file describes (path, or an open ``gguf.GGUFReader``)."""
        from .loading.gguf_file import metadata_from_reader, read_gguf_metadata

        if isinstance(reader_or_path, (str, os.PathLike)):
            meta = read_gguf_metadata(reader_or_path)
            where = str(reader_or_path)
        elif hasattr(reader_or_path, "fields"):
            meta = metadata_from_reader(reader_or_path)
            where = "GGUF reader"
        elif isinstance(reader_or_path, dict):  # already-parsed metadata
            meta, where = reader_or_path, "GGUF metadata"
        else:
            raise ConfigError(f"from_gguf needs a path or a gguf.GGUFReader, got {type(reader_or_path).__name__}")
        return cls._from_gguf_metadata(meta, where)

    @classmethod
    def _from_gguf_metadata(cls, meta: dict[str, Any], where: str) -> "Tokenizer":
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if model is None or tokens is None:
            raise ConfigError(f"{where} has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
        arch = meta.get("general.architecture", "")
        types = meta.get("tokenizer.ggml.token_type")
        types = [int(t) for t in types] if types is not None else [1] * len(tokens)
        if model == "gpt2":
            backend = _byte_level_backend(tokens, meta.get("tokenizer.ggml.merges"), meta.get("tokenizer.ggml.pre"))
            alphabet = set(_byte_alphabet().values())
            # A "control" token spelled outside the byte alphabet is a llama.cpp mislabel; skip it.
            control = [t for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
        elif model == "llama":
            style = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma", "phi3": "phi3"}.get(arch, "llama")
            backend = _spm_backend(tokens, meta.get("tokenizer.ggml.scores"), style)
            control = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
        else:
            raise UnsupportedArchitectureError(
                f"{where}: tokenizer model {model!r} is not supported; pocketvlm reads 'gpt2' (byte-level BPE) "
                "and 'llama' (sentencepiece BPE) vocabularies"
            )
        if control:
            backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
        vocab = backend.get_vocab(with_added_tokens=False)
        user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
        if user:
            backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

        def tok(key):
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if add_bos is None and model == "llama":
            add_bos = True  # llama.cpp's default for sentencepiece vocabularies
        extra = [int(meta[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        return cls(
            backend,
            bos_token=tok("bos_token_id"), eos_token=tok("eos_token_id"),
            pad_token=tok("padding_token_id"), unk_token=tok("unknown_token_id"),
            add_bos_token=bool(add_bos), add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"), extra_eos_token_ids=extra,
        )

    # -- queries -------------------------------------------------------------------------------
    @property
    def backend(self) -> _Backend:
        """The underlying ``tokenizers.Tokenizer`` (read-only use, please)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token) if self.pad_token else None

    @property
    def add_bos_token(self) -> bool:
        """Whether ``encode(..., add_special_tokens=True)`` starts with BOS."""
        bos = self.bos_token_id
        return bos is not None and self._backend.encode("", add_special_tokens=True).ids[:1] == [bos]

    # -- work ------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() needs a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_as_text(self, text: str) -> list[int]:
        """``text`` tokenized with any special-token string in it read as plain text (what a user typed)."""
        if self._as_text is None:
            t = _Backend.from_str(self._backend.to_str())
            t.encode_special_tokens = True
            self._as_text = t
        return self._as_text.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"eos_token_ids={sorted(self.eos_token_ids)}, chat_template={'yes' if self.chat_template else 'no'})")


class StreamDecoder:
    """Incremental detokenization: ``push(id)`` returns only newly completed text.

    Text whose last character is still incomplete (a UTF-8 sequence spread over several byte-level
    or byte-fallback tokens, which decodes to U+FFFD) is held back until the next token completes
    it; ``flush()`` returns whatever is left. The concatenation of all pushes plus ``flush()``
    equals ``tokenizer.decode(all_ids)``. Decoding works on a short window (the tokens since the
    last emitted boundary), so the cost per token stays constant and decoders that strip a leading
    space (SentencePiece) see the same context twice and cancel out.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens up to here have been emitted

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd") and new_text.startswith(prefix_text):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self, final: bool = False) -> str:
        """The held-back rest (possibly with U+FFFD if the stream ended mid-character); resets nothing.
        ``final``: the answer ends here (``max_tokens`` cut it mid-character): a trailing half character is
        dropped rather than shown as U+FFFD."""
        if self._read == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        # The next window starts at an already-emitted token, as after a normal push.
        self._prefix, self._read = self._read, len(self.ids)
        out = new_text[len(prefix_text):] if new_text.startswith(prefix_text) else new_text
        return out.rstrip("\ufffd") if final else out

    def reset(self) -> None:
        self.ids.clear()
        self._prefix = self._read = 0
