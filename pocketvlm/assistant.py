"""The two-model pocket assistant: a small VLM looks, a chat LLM answers, and the pair is one model.

A small VLM sees well enough but writes poorly; a good small chat model writes well but cannot see. An
:class:`Assistant` asks the VLM about each picture (the *describe prompt*, with the user's question in it so
the VLM looks for what matters), puts the VLM's words into a system-side context block for the chat model
(the *context template*), and lets the chat model answer. It has the chat API of a :class:`PocketModel`
(``chat``, ``chat_stream``, ``complete_chat``, ``reset``, ``info``) and the hooks the server's scheduler uses
(``chat_prompt``, ``new_slot``, ``run``), so the CLI, ``pocketvlm serve`` and :class:`pocketvlm.Engine` take it
as they take any model.

Rules, each chosen and tested:

* **One look per image and question that brought it.** A description is cached by the sha256 of the image's
  pixels and the describe prompt as rendered (with the text of the user message the image came in). Follow-up
  turns about the same picture reuse it: the VLM does not run again. A new look is asked for explicitly:
  ``chat(..., look_again=True)`` (``/look`` in ``pocketvlm chat``) gives the latest user question to the VLM
  for every image of the conversation (cached under that question, so asking twice looks once).
* Text-only conversations go straight to the chat model, unchanged.
* Several images get one description each, labelled ``Image 1``, ``Image 2``, ... in the order they appear;
  the user messages keep an ``[Image N]`` marker where each image was.
* The chat model never receives images, only the descriptions. So a VLM may be the chat model (allowed:
  it answers from the description like any text model); the vision model must be a VLM (an error otherwise).
* An image the VLM cannot read raises :class:`~pocketvlm.errors.ImageError` before the chat model is called.
* A description too long for the chat model's context (after the conversation and room for the answer,
  ``min(max_tokens, context / 4)`` tokens) is cut to fit, with a warning (``warnings`` in :meth:`last_info`
  and the API's ``pocketvlm`` field, and Python's :mod:`warnings`).
* Memory policy: ``resident`` keeps both models loaded (fastest); ``sequential`` loads the VLM only to
  describe, frees it, then loads the chat model (peak memory near the larger of the two, not their sum;
  every new image costs two loads). Text-only turns and cached descriptions keep the chat model loaded.
"""
from __future__ import annotations

import ctypes
import gc
import hashlib
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path

from .assistant_config import (DEFAULT_CONTEXT_TEMPLATE, DEFAULT_DESCRIBE_PROMPT, AssistantConfig, AssistantWarning,
                               is_assistant_file)
from .errors import AssistantError

_PLACEHOLDER = "\x00pocketvlm-image\x00"


def describe_line(record: dict) -> str:
    """One image's line of the context block: its label, the question it was looked at for, what the VLM said.
    Without the question a one-word answer such as "B" means nothing to the chat model; and with the answer
    right after a bare "Image 1 (...):" label, Qwen2.5-0.5B answered count questions with the label's "1"."""
    asked = f"asked {record['question']!r}, " if record["question"] else ""
    return f"Image {record['image']}: {asked}the vision model answered: {record['description']}"


def load_any(source=None, **load_kwargs):
    """:func:`pocketvlm.api.load` for a model source, :class:`Assistant` for an assistant ``.json`` file
    (``load_kwargs`` then apply to both of its models, under each model's own ``vision_load`` / ``chat_load``)."""
    from .api import load

    if source is not None and is_assistant_file(source):
        return Assistant.from_file(source, load_kwargs=load_kwargs)
    return load(source, **load_kwargs)


def _free_memory() -> None:
    """Collect freed models and hand glibc's free heap back to the system (so RSS really falls)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the allocator keeps its pages, which only RSS (not correctness) sees


def _hash(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


class _Slot:
    """A scheduler slot of an assistant: the chat model's KV cache, made when first used and dropped when the
    chat model is freed (sequential policy), so a slot never keeps a freed model alive."""

    def __init__(self):
        self.inner = None

    @property
    def keys(self) -> list:
        return self.inner.keys if self.inner is not None else []

    def reset(self) -> None:
        if self.inner is not None:
            self.inner.reset()


class Assistant:
    """A vision model that looks and a chat model that answers, used as one model (see the module docstring).

    ``vision`` / ``chat``: sources or, for the resident policy, loaded :class:`PocketModel` s. The other
    keywords are :class:`AssistantConfig`'s; ``load_kwargs`` are :func:`pocketvlm.load` options for both."""

    architecture = "assistant"
    is_vlm = True  # it takes images (its VLM reads them)

    def __init__(self, vision, chat, *, describe_prompt: str = DEFAULT_DESCRIBE_PROMPT,
                 context_template: str = DEFAULT_CONTEXT_TEMPLATE, vision_options: dict | None = None,
                 chat_options: dict | None = None, vision_load: dict | None = None, chat_load: dict | None = None,
                 memory: str = "resident", name: str | None = None, load_kwargs: dict | None = None,
                 description_cache_size: int = 256):
        from .api import PocketModel

        loaded = {k: m for k, m in (("vision", vision), ("chat", chat)) if isinstance(m, PocketModel)}
        self.config = AssistantConfig(
            vision=str(vision.loaded.source) if "vision" in loaded else str(vision),
            chat=str(chat.loaded.source) if "chat" in loaded else str(chat),
            describe_prompt=describe_prompt, context_template=context_template,
            vision_options=dict(vision_options or {}), chat_options=dict(chat_options or {}),
            vision_load=dict(vision_load or {}), chat_load=dict(chat_load or {}), memory=memory, name=name)
        if loaded and memory == "sequential":
            raise AssistantError("the sequential memory policy loads and frees its models, so it needs their sources "
                                 f"(paths or names), not loaded models (got a loaded {', '.join(loaded)} model)")
        self.load_kwargs = dict(load_kwargs or {})
        self._lock = threading.RLock()
        self._slots: weakref.WeakSet = weakref.WeakSet()
        self._descriptions: OrderedDict[str, str] = OrderedDict()
        self._cache_size = description_cache_size
        self.looks = 0  # how many times the VLM described an image (observable for tests and benchmarks)
        self.loads = {"vision": 0, "chat": 0}
        self._last: dict | None = None
        self._vision = loaded.get("vision")
        self._chat = loaded.get("chat")
        if memory == "resident":
            self._vision = self._vision or self._load("vision")
            self._chat = self._chat or self._load("chat")
            self._check_vision(self._vision)
        else:
            self._check_sources()
            self._chat = self._load("chat")

    @classmethod
    def from_config(cls, cfg: AssistantConfig, load_kwargs: dict | None = None) -> Assistant:
        d = cfg.to_dict()
        return cls(d.pop("vision"), d.pop("chat"), load_kwargs=load_kwargs, **d)

    @classmethod
    def from_file(cls, path, load_kwargs: dict | None = None) -> Assistant:
        return cls.from_config(AssistantConfig.from_file(path), load_kwargs)

    # --- the two models --------------------------------------------------------------------------------
    def _load(self, which: str):
        from .api import load

        src = getattr(self.config, which)
        kw = {**self.load_kwargs, **getattr(self.config, f"{which}_load")}
        self.loads[which] += 1
        return load(src, **kw)

    def _check_vision(self, vlm) -> None:
        if not vlm.is_vlm:
            raise AssistantError(f"the assistant's vision model {self.config.vision!r} is a text-only model "
                                 f"({vlm.architecture}): it cannot look at images; name a vision-language model")

    def _check_sources(self) -> None:
        """Both sources exist, and the vision one is a VLM, read from its config without loading weights."""
        from . import loading
        from .real_models import resolve_source

        for which in ("vision", "chat"):
            kind, path = loading.resolve(resolve_source(getattr(self.config, which)))
            if which == "vision" and Path(path).is_dir():
                cfg = loading.read_config(Path(path))
                if "vision_config" not in cfg and "mm_vision_tower" not in cfg:
                    raise AssistantError(f"the assistant's vision model {self.config.vision!r} is a text-only model "
                                         f"({cfg.get('model_type')}): it cannot look at images")

    def _release(self, which: str) -> None:
        if which == "chat":
            for s in list(self._slots):
                s.inner = None
        setattr(self, f"_{which}", None)
        _free_memory()

    def vision_model(self):
        """The VLM, loaded (the chat model freed first under the sequential policy)."""
        if self._vision is None:
            if self.config.memory == "sequential" and self._chat is not None:
                self._release("chat")
            self._vision = self._load("vision")
            self._check_vision(self._vision)
        return self._vision

    def chat_model(self):
        """The chat model, loaded (the VLM freed first under the sequential policy)."""
        if self._chat is None:
            if self.config.memory == "sequential" and self._vision is not None:
                self._release("vision")
            self._chat = self._load("chat")
        return self._chat

    # --- facts the server and CLI read ------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.name or f"assistant({Path(self.config.vision).name}+{Path(self.config.chat).name})"

    @property
    def context_window_size(self) -> int:
        return self.chat_model().context_window_size

    @property
    def max_slots(self) -> int:
        """Concurrent generations the server may run: one under the sequential policy (a look frees the chat
        model, which no generation may be using)."""
        return 1 if self.config.memory == "sequential" else 1 << 30

    def info(self) -> dict:
        return {"source": self.name, "architecture": self.architecture, "vision": True,
                "vision_model": self.config.vision, "chat_model": self.config.chat, "memory": self.config.memory,
                "context_window_size": self.context_window_size, "looks": self.looks,
                "describe_prompt": self.config.describe_prompt}

    def last_info(self) -> dict | None:
        """What the last prompt was built from: the descriptions (with timing) and any warnings."""
        return self._last

    def reset(self) -> None:
        for m in (self._vision, self._chat):
            if m is not None:
                m.reset()

    def new_slot(self) -> _Slot:
        s = _Slot()
        self._slots.add(s)
        return s

    # --- looking ---------------------------------------------------------------------------------------
    def describe(self, image, question: str = "") -> tuple[str, bool, float]:
        """(description, from the cache?, milliseconds spent) for one image and the question it came with."""
        from .image import image_hash, load_image

        img = load_image(image)  # an unreadable image fails here, before any model runs
        prompt = self.config.describe_prompt.replace("{question}", question.strip())
        key = _hash(image_hash(img), prompt)
        with self._lock:
            if key in self._descriptions:
                self._descriptions.move_to_end(key)
                return self._descriptions[key], True, 0.0
            t0 = time.perf_counter()
            vlm = self.vision_model()
            messages = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": prompt}]}]
            text = vlm.chat(messages, **self.config.vision_options).strip()
            self.looks += 1
            self._descriptions[key] = text
            while len(self._descriptions) > self._cache_size:
                self._descriptions.popitem(last=False)
            return text, False, 1000 * (time.perf_counter() - t0)

    def _looks(self, messages: list[dict], look_again: bool) -> tuple[list[dict], list[dict]]:
        """Messages for the chat model (images replaced by ``[Image N]``) and one description record per image."""
        from .chat import normalize_messages

        msgs, images = normalize_messages(messages, image_placeholder=_PLACEHOLDER, content_format="string")
        if not images:
            return msgs, []
        questions, k = [], 0
        for m in msgs:
            text = m.get("content") or ""
            n = text.count(_PLACEHOLDER)
            question = " ".join(text.replace(_PLACEHOLDER, " ").split())
            questions += [question] * n
            for _ in range(n):
                k += 1
                text = text.replace(_PLACEHOLDER, f"[Image {k}]", 1)
            if n:
                m["content"] = text
        if look_again:
            last = next((m.get("content") for m in reversed(msgs) if m.get("role") == "user"), "") or ""
            questions = [" ".join(last.split())] * len(images)
        # every image is read (and checked) before any model runs
        from .image import load_image

        pil = [load_image(src) for src in images]
        records = []
        for i, (img, q) in enumerate(zip(pil, questions), 1):
            text, cached, ms = self.describe(img, q)
            records.append({"image": i, "question": q, "description": text, "cached": cached,
                            "describe_ms": round(ms, 1)})
        return msgs, records

    # --- the chat model's prompt -----------------------------------------------------------------------
    def _with_context(self, msgs: list[dict], block: str) -> list[dict]:
        context = self.config.context_template.replace("{descriptions}", block)
        if msgs and msgs[0].get("role") == "system":
            return [{"role": "system", "content": f"{msgs[0].get('content') or ''}\n\n{context}"}] + msgs[1:]
        return [{"role": "system", "content": context}] + msgs

    def chat_prompt(self, messages: list[dict], *, look_again: bool = False, max_tokens: int | None = None):
        """The chat model's :class:`~pocketvlm.prompts.Prompt` for ``messages``: each image described (or taken
        from the cache), the descriptions in the system-side context block. ``prompt.extra`` holds them."""
        with self._lock:
            msgs, records = self._looks(messages, look_again)
            chat = self.chat_model()
            extra = {"assistant": {"vision": self.config.vision, "chat": self.config.chat,
                                   "memory": self.config.memory}, "descriptions": records, "warnings": []}
            if not records:
                prompt = chat.chat_prompt(msgs)
            else:
                block = "\n".join(describe_line(r) for r in records)
                prompt = chat.chat_prompt(self._with_context(msgs, block))
                ctx = chat.context_window_size
                room = min(int(max_tokens or self.config.chat_options.get("max_tokens") or 256), ctx // 4)
                over = len(prompt.ids) + room - ctx
                if over > 0:
                    block, note = self._cut(chat, block, over)
                    extra["warnings"].append(note)
                    warnings.warn(note, AssistantWarning, stacklevel=3)
                    prompt = chat.chat_prompt(self._with_context(msgs, block))
            prompt.extra = extra
            self._last = extra
            return prompt

    @staticmethod
    def _cut(chat, block: str, over: int) -> tuple[str, str]:
        marker = " [description cut to fit the chat model's context]"
        ids = chat.tokenizer.encode(block, add_special_tokens=False)
        keep = max(0, len(ids) - over - len(chat.tokenizer.encode(marker, add_special_tokens=False)))
        note = (f"the image description ({len(ids)} tokens) did not fit the chat model's context window "
                f"({chat.context_window_size} tokens with the conversation and room for the answer); "
                f"kept its first {keep} tokens")
        return chat.tokenizer.decode(ids[:keep]) + marker, note

    # --- generation (the PocketModel API) --------------------------------------------------------------
    def run(self, prompt, *, slot: _Slot | None = None, **kw):
        """Stream the chat model's :class:`~pocketvlm.api.Event` s for a prompt from :meth:`chat_prompt`."""
        chat = self.chat_model()
        opts = {**self.config.chat_options, **{k: v for k, v in kw.items() if v is not None}}
        if slot is None:
            return chat.run(prompt, **opts)
        if slot.inner is None:
            slot.inner = chat.new_slot()
        return chat.run(prompt, slot=slot.inner, **opts)

    def _prompt_for(self, messages, look_again: bool, kw: dict):
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.chat_prompt(messages, look_again=look_again, max_tokens=kw.get("max_tokens"))

    def chat_stream(self, messages, *, look_again: bool = False, **kw):
        prompt = self._prompt_for(messages, look_again, kw)
        for ev in self.run(prompt, **kw):
            if ev.text:
                yield ev.text

    def chat(self, messages, *, stream: bool = False, look_again: bool = False, **kw):
        """Answer OpenAI-style ``messages`` as :meth:`PocketModel.chat` does (``stream=True``: text pieces)."""
        if stream:
            return self.chat_stream(messages, look_again=look_again, **kw)
        return self.complete_chat(messages, look_again=look_again, **kw).text

    def generate(self, prompt, **kw):
        """Raw completion (no chat template, no images): the chat model's."""
        return self.chat_model().generate(prompt, **kw)

    def stream(self, prompt, **kw):
        return self.chat_model().stream(prompt, **kw)

    def complete_chat(self, messages, *, look_again: bool = False, **kw):
        prompt = self._prompt_for(messages, look_again, kw)
        chat = self.chat_model()
        return chat._collect(self.run(prompt, **kw))

