"""What the engine takes (:class:`Prompt`), and for a VLM the turning of a rendered chat prompt with image
placeholders into one.

Each image placeholder token in the prompt is expanded to the number of feature rows its image produces
(``model.num_image_tokens(image_size)``). The features are computed once per distinct image (cache keyed by
the image's content hash) and spliced into the text embeddings at those positions, as Hugging Face does
with ``masked_scatter``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ContextWindowError, ImageError
from .image import image_hash, load_image, preprocess


@dataclass
class Prompt:
    """A prompt ready for the engine: ``keys`` per position, ``ids`` (image positions hold the image
    token id) and an ``embed_fn`` when image features must be spliced in."""

    keys: list
    ids: list[int]
    embed_fn: Any = None
    n_images: int = 0
    stop_ids: set | None = None  # None: the tokenizer's EOS ids
    extra: dict | None = None  # what an assistant built the prompt from (its descriptions), for the response


def encode_image(pm, img) -> tuple[str, torch.Tensor]:
    """(content hash, features [n_tokens, hidden]) for one RGB image, from the cache when seen before."""
    return encode_images(pm, [img])[0]


def encode_images(pm, imgs: list) -> list[tuple[str, torch.Tensor]]:
    """:func:`encode_image` for several RGB images, the ones not in the cache through the vision tower in one
    batch (each image's features depend on that image only: every tower op works per image, per token)."""
    hashes = [image_hash(img) for img in imgs]
    todo = {}
    for h, img in zip(hashes, imgs):
        if h in pm._image_cache:
            pm._image_cache.move_to_end(h)
        else:
            todo.setdefault(h, img)
    if todo:
        if pm.image_processor is None:
            raise ImageError("this model has no image processor configuration (preprocessor_config.json)")
        pres = [preprocess(img, pm.image_processor, dtype=pm.dtype, device=pm.device) for img in todo.values()]
        with torch.inference_mode():
            out = pm.model.encode_images([p.pixel_values for p in pres], image_sizes=[p.image_size for p in pres])
        pm.images_encoded += len(pres)
        for i, h in enumerate(todo):  # out: [n, n_tokens, hidden] or a list of [n_tokens_i, hidden]
            pm._image_cache[h] = out[i] if isinstance(out, (list, tuple)) else out[i].reshape(-1, out.shape[-1])
    found = [(h, pm._image_cache[h]) for h in hashes]
    while len(pm._image_cache) > pm._image_cache_size:
        pm._image_cache.popitem(last=False)
    return found


def build_image_prompt(pm, ids: list[int], images: list):
    image_id = pm.model.image_token_id
    slots = [i for i, t in enumerate(ids) if t == image_id]
    if len(slots) != len(images):
        raise ImageError(f"the prompt has {len(slots)} image placeholder(s) for {len(images)} image(s)")
    encoded = [encode_image(pm, load_image(src)) for src in images]
    n_total = len(ids) - len(slots) + sum(f.shape[0] for _, f in encoded)
    if n_total >= pm.context_window_size:
        raise ContextWindowError(
            f"the prompt with {len(images)} image(s) needs {n_total} tokens but the context window is "
            f"{pm.context_window_size}; send fewer or smaller images, or raise context_window_size")
    new_ids, keys, rows = [], [], []
    k = 0
    for t in ids:
        if t != image_id:
            new_ids.append(t)
            keys.append(t)
            rows.append(None)
            continue
        h, feats = encoded[k]
        for r in range(feats.shape[0]):
            new_ids.append(t)
            keys.append(("img", h, r))
            rows.append((k, r))
        k += 1
    embed = pm.model.get_input_embeddings()

    def embed_fn(start: int, end: int) -> torch.Tensor:
        chunk = torch.tensor([[0 if r is not None else t for t, r in zip(new_ids[start:end], rows[start:end])]],
                             device=pm.device)
        e = embed(chunk).clone()
        for j, r in enumerate(rows[start:end]):
            if r is not None:
                e[0, j] = encoded[r[0]][1][r[1]].to(e.dtype)
        return e

    return Prompt(keys, new_ids, embed_fn, len(images), stop_ids=pm.chat_stop_ids)


# --- special-token text typed by a user ------------------------------------------------------------------
_MARK = re.compile("\ue000(\\d+)\ue001")  # private-use marks standing for a typed special-token string


def protect_special_text(messages: list[dict], special_strings) -> tuple[list[dict], list[str]]:
    """``messages`` with every special-token string in their text (``<|im_end|>`` typed by a user) replaced by
    a mark, and the strings the marks stand for: :func:`encode_prompt_text` then tokenizes them as plain text,
    so the chat template's special tokens come only from the template. Unchanged when no text has one."""
    found: list[str] = []
    if not special_strings:
        return messages, found
    pattern = re.compile("|".join(re.escape(t) for t in special_strings))

    def mark(text):
        def sub(m):
            found.append(m.group(0))
            return f"\ue000{len(found) - 1}\ue001"
        return pattern.sub(sub, text) if isinstance(text, str) else text

    out = []
    for m in messages:
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, str):
            m = {**m, "content": mark(c)}
        elif isinstance(c, list):
            m = {**m, "content": [{**p, "text": mark(p["text"])} if isinstance(p, dict) and p.get("type") == "text"
                                  and isinstance(p.get("text"), str) else p for p in c]}
        out.append(m)
    return (out, found) if found else (messages, found)


def encode_prompt_text(tokenizer, text: str, literals: list[str]) -> list[int]:
    """Token ids of rendered prompt ``text``: the template's special tokens parsed, marked ``literals`` (see
    :func:`protect_special_text`) read as plain text."""
    if not literals:
        return tokenizer.encode(text, add_special_tokens=False)
    ids, pos = [], 0
    for m in _MARK.finditer(text):
        if m.start() > pos:
            ids += tokenizer.encode(text[pos:m.start()], add_special_tokens=False)
        ids += tokenizer.encode_as_text(literals[int(m.group(1))])
        pos = m.end()
    if pos < len(text):
        ids += tokenizer.encode(text[pos:], add_special_tokens=False)
    return ids
