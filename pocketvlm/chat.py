"""Chat templates, rendered the way Hugging Face ``apply_chat_template`` renders them.

Stable API (other modules rely on it)::

    text = render_chat(messages, template, add_generation_prompt=True,
                       bos_token="<s>", eos_token="</s>", tools=None, **extra_template_vars)
    ids = encode_chat(tokenizer, messages, template=None, add_generation_prompt=True, add_bos=None)
    template = get_template("chatml")          # built-in by name; TemplateError lists known names
    template = resolve_template(tokenizer, name=None)   # the tokenizer's own, or a named one
    msgs, images = normalize_messages(messages, image_placeholder="<image>", content_format="string")
    stops = stop_token_ids(tokenizer, template)  # tokenizer.eos_token_ids + the template's end-of-turn
    BUILTIN_TEMPLATES: dict[str, str]

Rendering: Jinja2 ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the
``loopcontrols`` extension, ``raise_exception``, ``strftime_now`` and HF's ``tojson`` (no HTML
escaping, ``ensure_ascii=False``). Variables: ``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token``, ``tools`` (None unless given), ``documents`` (None) and any extra keyword. Messages are
copied into plain JSON-like data first (images or other objects become an inert placeholder
string), as HF does, so a template cannot call methods on them. Every failure (unknown name, syntax
error, ``raise_exception``, a message without a role) raises :class:`~pocketvlm.errors.TemplateError`.

BOS: Hugging Face's ``apply_chat_template(tokenize=True)`` encodes the rendered text with
``add_special_tokens=False``; a template that wants BOS writes ``{{ bos_token }}`` itself (Gemma,
Llama-2). ``encode_chat(add_bos=None)`` ("auto") adds BOS only when the tokenizer adds BOS to plain
text *and* the rendered prompt does not already start with it, so there is never a double BOS; for
templates that write BOS, or tokenizers that add none (Qwen), this equals HF exactly. Templates
that omit BOS for a BOS-trained vocabulary (TinyLlama's zephyr, Phi-3) get one, as llama.cpp does;
pass ``add_bos=False`` to reproduce HF's token ids bit for bit in that case.

Images in messages: ``content`` may be a string or a list of OpenAI-style parts
(``{"type": "text", "text": ...}``, ``{"type": "image_url", "image_url": {"url": ...}}``,
``{"type": "image", "image"|"url"|"path": ...}``, ``{"type": "input_image", "image_url": ...}``).
:func:`normalize_messages` returns the messages in one of two shapes plus the image sources in order:

* ``content_format="string"`` (default): every content becomes a string, each image replaced by
  ``image_placeholder`` and parts joined by ``part_separator`` (default "\\n", LLaVA's
  ``"<image>\\nWhat is this?"``). Use for text-only templates (ChatML, Qwen2.5, Llama, Vicuna,
  Phi-3, zephyr): the VLM then splices image features at the placeholder token.
* ``content_format="parts"``: every content becomes HF-style parts ``[{"type": "image"},
  {"type": "text", "text": ...}]`` (a plain string becomes one text part). Use for templates that
  loop over ``message['content']`` themselves (LLaVA-OneVision, Qwen2-VL, Gemma 3 HF templates);
  they write their own image markers.

Which one is a property of the model family (its processor/template), chosen by the caller's model
code, never guessed from the template text or a file name.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ImageError, TemplateError

__all__ = [
    "BUILTIN_TEMPLATES", "get_template", "resolve_template", "render_chat", "encode_chat",
    "normalize_messages", "stop_token_ids",
]

# ---------------------------------------------------------------------------------------------
# Built-in templates for checkpoints that ship none. Each renders its family's documented format.
# ---------------------------------------------------------------------------------------------
_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} </s><s>[INST] {user} [/INST]
_LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = none %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message is not none %}"
    "{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Vicuna v1.1 / LLaVA-1.5: "{system} USER: {user} ASSISTANT: {assistant}</s>USER: ... ASSISTANT:"
_VICUNA = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set system = 'A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user\\'s questions.' %}"
    "{% set loop_messages = messages %}"
    "{% endif %}"
    "{{ system + ' ' }}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('vicuna template: unsupported role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Gemma 3: system text is folded into the first user turn; assistant is called "model".
_GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% else %}{% set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' %}{% endif %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% elif message['content'] is iterable %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}"
    "{% else %}{{ raise_exception('Invalid content type') }}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

_PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% else %}{{ raise_exception('phi-3 template: unsupported role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Zephyr / TinyLlama-1.1B-Chat: "<|user|>\n{content}</s>\n", generation prompt "<|assistant|>\n".
_ZEPHYR = (
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# RedPajama-INCITE-Chat: "<human>: {user}\n<bot>: {assistant}\n", generation prompt "<bot>:".
_REDPAJAMA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<human>: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<bot>: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<bot>:' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "llama-2": _LLAMA2,
    "vicuna": _VICUNA,
    "gemma": _GEMMA,
    "phi-3": _PHI3,
    "zephyr": _ZEPHYR,
    "redpajama_chat": _REDPAJAMA,
}

# End-of-turn spellings a template may write; stopping generation there is the point of a chat.
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|eom_id|>", "</s>", "<turn|>")


def get_template(name: str) -> str:
    """The built-in template called ``name`` (exact name; no guessing from model or file names)."""
    try:
        return BUILTIN_TEMPLATES[name]
    except (KeyError, TypeError):
        raise TemplateError(
            f"unknown chat template {name!r}; known built-in templates: {', '.join(sorted(BUILTIN_TEMPLATES))}"
        ) from None


def resolve_template(tokenizer, name: str | None = None) -> str:
    """``name`` among the tokenizer's own named templates or the built-ins; without a name, the
    tokenizer's default template."""
    if name is None:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.chat_template
        raise TemplateError(
            "this model ships no chat template; choose one by name, e.g. template='chatml' "
            f"(known: {', '.join(sorted(BUILTIN_TEMPLATES))})"
        )
    own = getattr(tokenizer, "chat_templates", {}) or {}
    if name in own and own[name]:
        return own[name]
    return get_template(name)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's version: no HTML escaping, and the formatting options templates rely on.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes (no route to CPython internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for key in attrs:
            _Namespace._check(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, key, value):
        _Namespace._check(key)
        jinja2.utils.Namespace.__setitem__(self, key, value)

    @staticmethod
    def _check(key):
        if isinstance(key, str) and key.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {key!r}")


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: HF marks assistant text with it (for training
    masks); for rendering it is a plain block."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None


def _plain(value: Any) -> Any:
    """JSON-like copy of template input; anything else (images, tensors) becomes an inert string."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy / torch scalars
    return f"<{type(value).__name__}>"


def _check_messages(messages) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)):
        raise TemplateError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TemplateError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise TemplateError(f"message {i} has no 'role' (a string such as 'user', 'assistant' or 'system')")


def render_chat(
    messages: list[dict],
    template: str,
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = "",
    eos_token: str | None = "",
    tools: list[dict] | None = None,
    **kwargs,
) -> str:
    """Render ``messages`` with a Jinja chat template exactly as transformers does."""
    if not isinstance(template, str) or not template:
        raise TemplateError("no chat template given; pass a template string or get_template(name)")
    _check_messages(messages)
    compiled = _compile(template)
    chat = []
    for m in messages:
        # Templates read reasoning under several names; fill the standard ones as HF does.
        reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        chat.append(_plain(m))
    variables = {"bos_token": bos_token, "eos_token": eos_token, **_plain(kwargs)}
    try:
        return compiled.render(
            messages=chat, tools=_plain(tools), documents=None, add_generation_prompt=add_generation_prompt, **variables
        )
    except TemplateError:
        raise
    except jinja2.exceptions.TemplateError as e:  # raise_exception, undefined, sandbox violations
        raise TemplateError(f"chat template refused the conversation: {e.message or e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise TemplateError(f"chat template failed on these messages ({type(e).__name__}: {e})") from None


def encode_chat(
    tokenizer,
    messages: list[dict],
    template: str | None = None,
    *,
    add_generation_prompt: bool = True,
    add_bos: bool | None = None,
    **kwargs,
) -> list[int]:
    """Render then tokenize, never with a double BOS.

    ``template``: a template string, a built-in or tokenizer-named template name, or None for the
    tokenizer's own. ``add_bos``: None = add the tokenizer's BOS only if it adds one to plain text
    and the rendered prompt does not already start with it; False = never (HF's
    ``apply_chat_template(tokenize=True)``); True = unless already present.
    """
    if template is None or (isinstance(template, str) and "{" not in template):
        template = resolve_template(tokenizer, template)
    text = render_chat(
        messages, template, add_generation_prompt=add_generation_prompt,
        bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "", **kwargs,
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    want = tokenizer.add_bos_token if add_bos is None else add_bos
    if want and bos is not None and ids[:1] != [bos]:
        ids = [bos] + ids
    return ids


def stop_token_ids(tokenizer, template: str | None = None) -> set[int]:
    """Token ids that end a reply: the tokenizer's ``eos_token_ids`` plus every special
    end-of-turn token (``<|im_end|>``, ``<end_of_turn>``, ...) that ``template`` writes."""
    stops = set(tokenizer.eos_token_ids)
    for name in _END_OF_TURN:
        if template and name in template:
            tid = tokenizer.token_to_id(name)
            if tid is not None and tokenizer.is_special(tid):
                stops.add(tid)
    if template and "eos_token" in template and tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    return stops


# ---------------------------------------------------------------------------------------------
# Multimodal messages
# ---------------------------------------------------------------------------------------------
_IMAGE_TYPES = ("image_url", "image", "input_image")


def _image_source(part: dict, where: str):
    if part["type"] in ("image_url", "input_image"):
        src = part.get("image_url")
        if isinstance(src, dict):
            src = src.get("url")
    else:
        src = next((part[k] for k in ("image", "url", "path", "image_url") if part.get(k) is not None), None)
        if isinstance(src, dict):
            src = src.get("url")
    if src is None or (isinstance(src, str) and not src):
        raise ImageError(f"{where}: image part without an image (give image_url.url, image, url or path)")
    return src


def normalize_messages(
    messages: list[dict],
    image_placeholder: str = "<image>",
    content_format: str = "string",
    part_separator: str = "\n",
) -> tuple[list[dict], list[Any]]:
    """Messages with ``content`` in one shape, plus the image sources (URLs, paths, data URLs or
    objects) in the order they appear. See the module docstring for which format to use when."""
    if content_format not in ("string", "parts"):
        raise TemplateError(f"content_format must be 'string' or 'parts', got {content_format!r}")
    _check_messages(messages)
    out, images = [], []
    for i, m in enumerate(messages):
        content = m.get("content")
        if content is None or isinstance(content, str):
            parts = None
        elif isinstance(content, (list, tuple)):
            parts = []
            for j, part in enumerate(content):
                where = f"message {i} part {j}"
                if isinstance(part, str):
                    part = {"type": "text", "text": part}
                if not isinstance(part, dict) or "type" not in part:
                    raise TemplateError(f"{where} must be a dict with a 'type' ('text', 'image_url' or 'image')")
                if part["type"] in ("text", "input_text"):
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise TemplateError(f"{where}: text part needs a string 'text'")
                    parts.append({"type": "text", "text": text})
                elif part["type"] in _IMAGE_TYPES:
                    images.append(_image_source(part, where))
                    parts.append({"type": "image"})
                else:
                    raise TemplateError(
                        f"{where}: unsupported content part type {part['type']!r}; use 'text', 'image_url' or 'image'"
                    )
        else:
            raise TemplateError(f"message {i}: content must be a string or a list of parts, got {type(content).__name__}")
        new = dict(m)
        if content_format == "parts":
            if parts is None:
                parts = [] if content is None else [{"type": "text", "text": content}]
            new["content"] = parts
        elif parts is not None:
            new["content"] = part_separator.join(
                image_placeholder if p["type"] == "image" else p["text"] for p in parts
            )
        out.append(new)
    return out, images
