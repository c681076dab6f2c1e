"""The Python API: ``pocketvlm.load(source)`` -> :class:`PocketModel`.

A PocketModel ties together a loaded model, its tokenizer and chat template, and the engine. Text and
images are turned into token ids / embeddings here; the engine (:mod:`pocketvlm.engine.generate`) only
sees ids and embeddings.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import loading
from .loading import load_image_processor, load_tokenizer  # noqa: F401 - also pocketvlm.api's API
from .engine.generate import Slot
from .engine.sampling import SamplingParams
from .errors import ContextWindowError, ImageError, TemplateError
from .models.base import is_vlm
from .prompts import Prompt, build_image_prompt, encode_prompt_text, protect_special_text

DEFAULT_CONTEXT = 4096
#: Characters per token no real text reaches on average: prompts longer than the context window times this
#: are refused before tokenization.
MAX_CHARS_PER_TOKEN = 32


@dataclass
class Event:
    """One step of a streamed answer: new text (possibly empty), the token, and on the last event the
    finish reason ("stop" or "length") and the token usage."""

    text: str
    token: int | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tokens: list[int] = field(default_factory=list)


class StopStringFilter:
    """Holds back text that might be the start of a stop string; cuts the text at the first stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def sampling_params(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, seed=None):
    return SamplingParams(temperature=float(temperature) if temperature is not None else 1.0,
                          top_p=float(top_p) if top_p is not None else 1.0, top_k=int(top_k or 0),
                          min_p=float(min_p or 0.0),
                          repetition_penalty=float(repetition_penalty) if repetition_penalty is not None else 1.0,
                          seed=seed)


class PocketModel:
    """A loaded model ready to chat. Thread-safety: one generation at a time per slot; the default slot
    is guarded by a lock, the server makes a slot per concurrent request."""

    def __init__(self, loaded: loading.Loaded, tokenizer, *, template: str | None = None,
                 context_window_size: int | None = None, prefill_chunk_size: int = 512,
                 image_processor=None, image_cache_size: int = 32, compile: bool = False,
                 fused: bool | None = None, kv_cache_dtype: str | torch.dtype | None = None,
                 vision_precision: str = "fp32"):
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        max_pos = getattr(self.text_config, "max_position_embeddings", DEFAULT_CONTEXT) or DEFAULT_CONTEXT
        self.context_window_size = int(context_window_size or min(max_pos, DEFAULT_CONTEXT))
        self.prefill_chunk_size = int(prefill_chunk_size)
        self.vision_precision = vision_precision if is_vlm(loaded.model) else "none"
        self.kv_cache_dtype = loading.kv_cache_dtype_for(kv_cache_dtype, (loaded.quantization or {}).get("mode"), self.dtype)
        self.template = self._pick_template(template)
        self._slot: Slot | None = None
        self.decode_step = None
        #: why the fused CPU decode step is not used (None when it is); see engine/fused.py
        self.fused_reason: str | None = "off"
        if compile:
            from .engine.compiled import CompiledDecode

            self.decode_step = CompiledDecode(self.model)
            self.fused_reason = "torch.compile was asked for"
        elif fused is not False:
            from .engine.fused import plan_or_reason

            self.decode_step, self.fused_reason = plan_or_reason(self.model)
            if fused and self.decode_step is None:
                raise ValueError(f"the fused decode step cannot run this model: {self.fused_reason}")
        self._lock = threading.Lock()
        self._image_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._image_cache_size = image_cache_size
        self.images_encoded = 0  # how many times the vision encoder ran (observable for tests/benchmarks)

    # --- facts -------------------------------------------------------------------------------------
    @property
    def text_config(self):
        return getattr(self.config, "text_config", self.config)

    @property
    def is_vlm(self) -> bool:
        return is_vlm(self.model)

    @property
    def architecture(self) -> str:
        return getattr(self.config, "model_type", type(self.model).__module__.rsplit(".", 1)[-1])

    @property
    def dtype(self) -> torch.dtype:
        """The language model's dtype (a VLM's tower may run in another precision; a quantized layer keeps its
        packed weights as buffers, so the first float parameter outside the tower and projector decides)."""
        return next(p for n, p in self.model.named_parameters()
                    if p.is_floating_point() and "vision_tower" not in n and "multi_modal_projector" not in n).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_parameters(self) -> int:
        """Weights of the model as defined (a quantized layer counts its logical in x out weights)."""
        from .quant.linear import QuantLinear

        seen, n = set(), 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        for m in self.model.modules():  # packed weights are buffers; a tied head shares its embedding's table
            if isinstance(m, QuantLinear) and id(m) not in seen:
                seen.add(id(m))
                n += m.in_features * m.out_features
        return n

    def info(self) -> dict:
        extra = {"mmproj": self.loaded.mmproj} if self.loaded.mmproj else {}
        return {
            "source": self.loaded.source, **extra, "format": self.loaded.kind, "architecture": self.architecture,
            "parameters": self.num_parameters(), "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device), "context_window_size": self.context_window_size,
            "max_position_embeddings": getattr(self.text_config, "max_position_embeddings", None),
            "vocab_size": getattr(self.text_config, "vocab_size", None),
            "template": self.template_name, "vision": self.is_vlm,
            "decode": "fused" if self.fused_reason is None else f"eager ({self.fused_reason})",
            "kv_cache_dtype": str(self.kv_cache_dtype).replace("torch.", ""),
            "vision_precision": self.vision_precision,
            "quantization": (self.loaded.quantization or {}).get("mode"),
        }

    # --- templates ---------------------------------------------------------------------------------
    def _pick_template(self, name: str | None) -> str | None:
        from .chat import get_template

        if name:
            self.template_name = name
            return get_template(name)
        self.template_name = "checkpoint" if self.tokenizer.chat_template else None
        return self.tokenizer.chat_template

    @property
    def chat_stop_ids(self) -> set[int]:
        from .chat import stop_token_ids

        return stop_token_ids(self.tokenizer, self.template)

    # --- low level ---------------------------------------------------------------------------------
    def logits(self, input_ids, attention_mask=None) -> torch.Tensor:
        """fp32 logits ``[B, S, V]`` of a full forward (the parity-check hook)."""
        ids = torch.as_tensor(input_ids, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        am = None if attention_mask is None else torch.as_tensor(attention_mask, device=self.device)
        with torch.inference_mode():
            return self.model(ids, attention_mask=am).float()

    def new_slot(self) -> Slot:
        return Slot(self.model, self.context_window_size, self.prefill_chunk_size, dtype=self.kv_cache_dtype,
                    decode_step=self.decode_step)

    @property
    def slot(self) -> Slot:
        if self._slot is None:
            self._slot = self.new_slot()
        return self._slot

    def reset(self) -> None:
        if self._slot is not None:
            self._slot.reset()

    # --- prompts -----------------------------------------------------------------------------------
    def text_prompt(self, prompt: str | list[int], add_special_tokens: bool = True) -> Prompt:
        ids = list(prompt) if not isinstance(prompt, str) else self.tokenizer.encode(prompt, add_special_tokens)
        return Prompt(list(ids), list(ids))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> tuple[str, list]:
        """Render OpenAI-style messages with the chat template; returns the text and the image sources."""
        from .chat import normalize_messages, render_chat

        if self.template is None:
            raise TemplateError(
                "this model has no chat template (a base model?); pass template=NAME (--template NAME: chatml, "
                "llama-2, vicuna, gemma, phi-3, zephyr, redpajama_chat), or complete the text as it is with "
                "model.generate(...) (`pocketvlm generate --raw`)")
        placeholder = getattr(self.model, "image_placeholder", "<image>")
        # Hugging Face VLM checkpoints' own templates iterate over content parts ({"type": "image"});
        # text-only templates and pocketvlm's built-in ones take content as a string with placeholders.
        parts = self.template_name == "checkpoint" and getattr(self.model, "template_uses_parts", self.is_vlm)
        fmt = "parts" if parts else "string"
        msgs, images = normalize_messages(messages, image_placeholder=placeholder, content_format=fmt)
        if images and not self.is_vlm:
            raise ImageError(f"{self.architecture} is a text-only model: it cannot take images "
                             "(load a vision-language model to ask about images)")
        text = render_chat(msgs, self.template, add_generation_prompt=add_generation_prompt,
                           bos_token=self.tokenizer.bos_token or "", eos_token=self.tokenizer.eos_token or "")
        return text, images

    def chat_prompt(self, messages: list[dict]) -> Prompt:
        messages, literals = protect_special_text(messages, self.tokenizer.special_strings)
        text, images = self.render(messages)
        cap = self.context_window_size * MAX_CHARS_PER_TOKEN
        if len(text) > cap:  # refused before tokenizing: a multi-megabyte prompt would hold the worker for seconds
            raise ContextWindowError(
                f"the prompt has {len(text):,} characters; a context window of {self.context_window_size} tokens "
                f"cannot hold more than {cap:,} (it would be cut anyway): shorten it")
        if images:
            # Encode around each placeholder and insert the model's image token id itself: some families
            # (MobileVLM: -200) use an id the tokenizer cannot produce.
            placeholder = getattr(self.model, "image_placeholder", "<image>")
            pieces = text.split(placeholder)
            ids = []
            for i, piece in enumerate(pieces):
                if i:
                    ids.append(self.model.image_token_id)
                if piece:
                    ids += encode_prompt_text(self.tokenizer, piece, literals)
        else:
            ids = encode_prompt_text(self.tokenizer, text, literals)
        bos = self.tokenizer.bos_token_id
        if self.tokenizer.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids  # the template did not write the BOS this tokenizer always starts with
        if not images:
            return Prompt(ids, ids, stop_ids=self.chat_stop_ids)
        return build_image_prompt(self, ids, images)

    # --- generation --------------------------------------------------------------------------------
    def run(self, prompt: Prompt, *, max_tokens: int = 256, stop: list[str] | str | None = None,
            slot: Slot | None = None, interleave: bool = False, **sampling) -> Iterator[Event | None]:
        """Stream :class:`Event` s for a prepared prompt. The last event has ``finish_reason`` set.
        ``interleave``: also yield ``None`` between prefill chunks, so that a scheduler can run other
        requests' steps while a long prompt is read (the server's)."""
        from .tokenizer import StreamDecoder

        params = sampling_params(**sampling)
        if max_tokens is None or max_tokens < 1:
            raise ContextWindowError(f"max_tokens must be >= 1 (got {max_tokens})")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        own = slot is None
        slot = slot or self.slot
        if own:
            self._lock.acquire()
        try:
            dec = StreamDecoder(self.tokenizer)
            filt = StopStringFilter(stops)
            n_prompt, n_out = len(prompt.ids), 0
            stop_ids = prompt.stop_ids if prompt.stop_ids is not None else self.tokenizer.eos_token_ids
            banned = [i for i in [getattr(self.model, "image_token_id", None)]
                      if i is not None and 0 <= i < self.text_config.vocab_size]
            for step in slot.generate(prompt.keys, prompt.ids, params, max_tokens, stop_ids, prompt.embed_fn,
                                      banned_ids=banned, yield_prefill=interleave):
                if step is None:  # a prefill chunk done (interleave)
                    yield None
                    continue
                n_out += 1
                finish = step.finish_reason
                text = "" if step.token in stop_ids else filt.push(dec.push(step.token))
                if filt.stopped:
                    finish = "stop"
                if finish:
                    if not filt.stopped:
                        text += filt.push(dec.flush(final=True)) + ("" if filt.stopped else filt.flush())
                    yield Event(text, step.token, finish, n_prompt, n_out)
                    return
                yield Event(text, step.token, None, n_prompt, n_out)
        finally:
            if own:
                self._lock.release()

    def _collect(self, events: Iterator[Event]) -> Completion:
        parts, tokens, last = [], [], None
        for ev in events:
            parts.append(ev.text)
            tokens.append(ev.token)
            last = ev
        return Completion("".join(parts), last.finish_reason, last.prompt_tokens, last.completion_tokens, tokens)

    def stream(self, prompt: str | list[int], **kw) -> Iterator[str]:
        """Raw completion of ``prompt`` (no chat template), streamed as text pieces."""
        for ev in self.run(self.text_prompt(prompt), **kw):
            if ev.text:
                yield ev.text

    def generate(self, prompt: str | list[int], *, stream: bool = False, **kw):
        """Raw completion of ``prompt``: the text (or, with ``stream=True``, an iterator of text pieces)."""
        if stream:
            return self.stream(prompt, **kw)
        return self._collect(self.run(self.text_prompt(prompt), **kw)).text

    def chat_stream(self, messages: list[dict], **kw) -> Iterator[str]:
        for ev in self.run(self.chat_prompt(messages), **kw):
            if ev.text:
                yield ev.text

    def chat(self, messages: list[dict] | str, *, stream: bool = False, **kw):
        """Answer OpenAI-style ``messages`` (content a string or a list of text / image_url parts)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if stream:
            return self.chat_stream(messages, **kw)
        return self._collect(self.run(self.chat_prompt(messages), **kw)).text

    def complete_chat(self, messages: list[dict], **kw) -> Completion:
        return self._collect(self.run(self.chat_prompt(messages), **kw))




def load(source: str | Path | None = None, *, device: str = "cpu", dtype: str | torch.dtype = "float32",
         context_window_size: int | None = None, prefill_chunk_size: int = 512, template: str | None = None,
         quantization: str | None = None, compile: bool = False, vision_precision: str = "auto",
         fused: bool | None = None, kv_cache_dtype: str | torch.dtype | None = None, mmproj=None,
         **kw) -> PocketModel:
    """Load a model from a Hugging Face folder or repo id, a ``.gguf`` file, a pocketvlm package folder,
    or a built-in real model name (default: ``pocketvlm-scenes``, the embedded VLM).

    ``quantization``: None keeps a source as it is stored, except that a ``.gguf`` file runs on its own
    quantized blocks ("gguf", as llama.cpp does) and a built-in model at its default (pocketvlm-scenes:
    q4f16_1); "q0f32" (or "q0f16", "q0bf16") dequantizes on purpose. ``info()["quantization"]`` says which runs.

    ``vision_precision`` applies to a VLM's vision tower only: "auto" (default: int8 on CPUs with AVX-512 VNNI,
    bf16 on CUDA, else fp32), "fp32" (exact), "bf16" or "int8"; see :mod:`pocketvlm.quant.vision_fast` for
    their measured speed and error. ``info()["vision_precision"]`` says which one runs.

    ``fused``: the one-call-per-token CPU decode step (:mod:`pocketvlm.engine.fused`) - ``None`` (default)
    uses it when the model qualifies (CPU, q4/q8 layers on pocketvlm's kernel), ``True`` requires it (an
    error says why a model does not qualify), ``False`` decodes with the eager PyTorch modules.

    ``kv_cache_dtype``: see :func:`pocketvlm.loading.kv_cache_dtype_for` (default: float16 for quantized float32 models).

    ``mmproj``: with a ``.gguf`` language model, llama.cpp's second file of a VLM (vision tower + projector),
    as ``llama-mtmd-cli -m MODEL --mmproj MMPROJ`` takes them (:mod:`pocketvlm.loading.mmproj`)."""
    from .real_models import DEFAULT_MODEL, default_quantization, resolve_source

    max_seq = context_window_size
    source = source or DEFAULT_MODEL
    if quantization is None:
        quantization = default_quantization(source)
    src = None
    if device == "cpu" and mmproj is None:  # a built-in folder at its default mode: its cached package
        from .package.builtin import packaged_source

        src = packaged_source(source, quantization)
    src = src or resolve_source(source)
    loaded = loading.load(src, device=device, dtype=dtype, max_seq_len=max_seq,
                          quantization=quantization, mmproj=mmproj, **kw)
    from .quant.vision_fast import apply_vision_precision

    vision = apply_vision_precision(loaded.model, vision_precision)  # "none" for text-only models
    tok = load_tokenizer(loaded)
    proc = load_image_processor(loaded) if is_vlm(loaded.model) else None
    return PocketModel(loaded, tok, template=template, context_window_size=context_window_size,
                       prefill_chunk_size=prefill_chunk_size, image_processor=proc, compile=compile, fused=fused,
                       kv_cache_dtype=kv_cache_dtype, vision_precision=vision)
