"""LLaVA-format training data -> token ids with a loss mask.

A data file is LLaVA's JSON: a list of ``{"id", "image", "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}`` (``image`` relative to the file's folder, or to
``image_folder``). Exactly one ``<image>`` per conversation, in a human turn; turns alternate human/gpt.

Tokens are built turn by turn with the model's own chat template: the text before each answer (system,
user turns, the assistant header) is rendered with ``add_generation_prompt=True`` and the answer is what the
full rendering adds after it (including the end-of-turn token, so the model learns to stop). Only answer
tokens carry labels; image slots, system and user turns are ``IGNORE``. A row that cannot be used (missing or
unreadable image, no or two ``<image>``, an empty answer, broken turn order) is skipped and counted with
its reason; a file with no usable row is an error.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataError

IGNORE = -100
IMAGE = "<image>"


@dataclass
class Sample:
    id: str
    image: Path
    input_ids: list[int]   # the image's slots hold image_token_id
    labels: list[int]      # IGNORE except answer tokens
    positions: list[int] | None = None  # independent turns packed in one row: each token's own position
    segments: list[int] | None = None   # and its turn (0: the shared prefix up to the image, k: turn k)


@dataclass
class Dataset:
    samples: list[Sample]
    skipped: Counter = field(default_factory=Counter)

    def report(self) -> str:
        s = f"{len(self.samples)} samples"
        if self.skipped:
            s += "; skipped " + ", ".join(f"{n} ({why})" for why, n in self.skipped.most_common())
        return s


def read_rows(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"training data {path} does not exist")
    text = path.read_text()
    try:
        rows = json.loads(text) if path.suffix != ".jsonl" else [json.loads(x) for x in text.splitlines() if x.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid LLaVA JSON: {e}") from e
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of conversations")
    return rows


def to_messages(conversations) -> list[dict]:
    """LLaVA turns -> chat messages with content parts; raises ValueError naming what is wrong."""
    if not isinstance(conversations, list) or len(conversations) < 2:
        raise ValueError("conversation has fewer than two turns")
    n_images = sum(str(t.get("value", "")).count(IMAGE) for t in conversations if isinstance(t, dict))
    if n_images == 0:
        raise ValueError("no <image> in the conversation")
    if n_images > 1:
        raise ValueError(f"{n_images} <image> placeholders (one image per conversation is supported)")
    msgs = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt", "system"):
            raise ValueError(f"turn {i} is not {{'from': 'human'|'gpt', 'value': ...}}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"turn {i} has no text value")
        role = {"human": "user", "gpt": "assistant", "system": "system"}[turn["from"]]
        if role == "assistant":
            if IMAGE in value:
                raise ValueError("<image> in an answer")
            if not value.strip():
                raise ValueError("empty answer")
            msgs.append({"role": "assistant", "content": value})
            continue
        parts = []
        for j, piece in enumerate(value.split(IMAGE)):
            if j:
                parts.append({"type": "image"})
            piece = piece.strip("\n") if j or IMAGE in value else piece
            if piece:
                parts.append({"type": "text", "text": piece})
        msgs.append({"role": role, "content": parts})
    roles = [m["role"] for m in msgs if m["role"] != "system"]
    if roles[0] != "user" or any(a == b for a, b in zip(roles, roles[1:])) or roles[-1] != "assistant":
        raise ValueError("turns must alternate human/gpt, starting with human and ending with gpt")
    return msgs


def single_turns(msgs: list[dict]) -> list[list[dict]]:
    """A conversation about one image -> one single-turn conversation per answer, each starting with the
    image (where LLaVA's own preprocessing puts it), the system message kept."""
    system = [m for m in msgs if m["role"] == "system"]
    rest = [m for m in msgs if m["role"] != "system"]
    out = []
    for user, answer in zip(rest[0::2], rest[1::2]):
        parts = [p for p in user["content"] if p["type"] != "image"]
        out.append(system + [{"role": "user", "content": [{"type": "image"}] + parts}, answer])
    return out


class Encoder:
    """Renders and tokenizes conversations for one model (tokenizer + chat template + image token id)."""

    def __init__(self, tokenizer, template: str, image_token_id: int, image_tokens: int = 1):
        from ..chat import render_chat

        self.tok, self.template, self.image_token_id = tokenizer, template, image_token_id
        self.image_tokens = image_tokens  # slots one image takes (the tower's feature rows)
        self._render = lambda msgs, gen: render_chat(
            msgs, template, add_generation_prompt=gen, bos_token=tokenizer.bos_token or "",
            eos_token=tokenizer.eos_token or "")

    def _ids(self, text: str) -> list[int]:
        ids = []
        for i, piece in enumerate(text.split(IMAGE)):
            if i:
                ids += [self.image_token_id] * self.image_tokens
            if piece:
                ids += self.tok.encode(piece, add_special_tokens=False)
        return ids

    def encode(self, msgs: list[dict]) -> tuple[list[int], list[int]]:
        ids, labels, done = [], [], ""
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prefix = self._render(msgs[:k], True)
            full = self._render(msgs[:k + 1], False)
            if not prefix.startswith(done) or not full.startswith(prefix):
                raise ConfigError("the chat template does not render conversations prefix by prefix; "
                                  "training needs a template whose earlier turns do not change later")
            ctx = self._ids(prefix[len(done):])
            ans = self.tok.encode(full[len(prefix):], add_special_tokens=False)
            ids += ctx + ans
            labels += [IGNORE] * len(ctx) + ans
            done = full
        bos = self.tok.bos_token_id
        if self.tok.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids, labels = [bos] + ids, [IGNORE] + labels
        return ids, labels

    def encode_independent(self, msgs: list[dict]) -> tuple[list[int], list[int], list[int], list[int]]:
        """Every question-answer turn as its own single-turn conversation with the image, packed in one row:
        the shared prefix (system, user header, image) once, then each turn with the positions it would have
        alone. With an attention mask that lets a turn see only the prefix and itself, each answer is learned
        exactly as it is asked at inference, and no answer can be read off an earlier turn; the image tokens
        are computed once per row. Returns (ids, labels, positions, segments)."""
        encoded = [self.encode(c) for c in single_turns(msgs)]
        first = encoded[0][0]
        p = 0
        while all(p < len(i) and i[p] == first[p] and lab[p] == IGNORE for i, lab in encoded):
            p += 1
        if any(self.image_token_id in i[p:] for i, _ in encoded):
            raise ConfigError("independent turns need the image in a prefix shared by every turn; this chat "
                              "template renders it elsewhere")
        ids, labels, pos, seg = first[:p], [IGNORE] * p, list(range(p)), [0] * p
        for k, (i, lab) in enumerate(encoded, 1):
            ids += i[p:]
            labels += lab[p:]
            pos += list(range(p, len(i)))
            seg += [k] * (len(i) - p)
        return ids, labels, pos, seg


TURNS = ("chat", "independent")


def load_dataset(path, encoder: Encoder, *, image_folder=None, max_samples: int | None = None,
                 check_images: bool = True, turns: str = "chat") -> Dataset:
    """Read, check and tokenize a LLaVA-format file; unusable rows are counted by reason, not fatal.

    ``turns="chat"`` learns a conversation as one dialogue (LLaVA's way: later answers see earlier turns);
    ``"independent"`` learns each question-answer turn alone with the image (``Encoder.encode_independent``),
    for data whose questions are independent of each other."""
    if turns not in TURNS:
        raise ConfigError(f"turns must be one of {', '.join(TURNS)}, got {turns!r}")
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    root = Path(image_folder) if image_folder else path.parent
    ds = Dataset([])
    for i, row in enumerate(read_rows(path)):
        if max_samples is not None and i >= max_samples:
            break
        rid = str(row.get("id", i)) if isinstance(row, dict) else str(i)
        try:
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise ValueError("no image path")
            msgs = to_messages(row.get("conversations"))
            img = Path(row["image"]) if Path(row["image"]).is_absolute() else root / row["image"]
            if not img.is_file():
                raise ValueError("image file missing")
            if check_images:
                try:
                    with Image.open(img) as im:
                        im.verify()
                except (UnidentifiedImageError, OSError, SyntaxError) as e:
                    raise ValueError("image file is not an image") from e
            pos = seg = None
            if turns == "independent":
                ids, labels, pos, seg = encoder.encode_independent(msgs)
            else:
                ids, labels = encoder.encode(msgs)
        except ConfigError:
            raise
        except ValueError as e:
            ds.skipped[str(e)] += 1
            continue
        if not any(t != IGNORE for t in labels):
            ds.skipped["no answer token"] += 1
            continue
        ds.samples.append(Sample(rid, img, ids, labels, pos, seg))
    if not ds.samples:
        raise DataError(f"{path}: no usable training sample ({ds.report()})")
    return ds
