"""OpenAI chat-completions request checking and response objects, shared by the server and :class:`Engine`.

Requests are plain dicts (parsed JSON or the keyword arguments of ``Engine.chat.completions.create``);
:func:`parse_chat_request` checks every field and raises :class:`~pocketvlm.errors.RequestError` or
:class:`~pocketvlm.errors.SamplingError` with the offending parameter name, so the server can answer in
OpenAI's error shape. Responses are :class:`OpenAIObject` s: attribute access like the ``openai`` package's
objects (``resp.choices[0].message.content``) and ``model_dump()`` for the JSON body.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import RequestError, SamplingError

ROLES = ("system", "developer", "user", "assistant")
MAX_STOP_STRINGS = 4


def _err(msg: str, param: str) -> RequestError:
    e = RequestError(msg)
    e.param = param
    return e


def _serr(msg: str, param: str) -> SamplingError:
    e = SamplingError(msg)
    e.param = param
    return e


@dataclass
class ChatRequest:
    """A checked chat request. ``messages`` are normalized (content is a string or a list of ``text`` /
    ``image_url`` parts with ``image_url`` a dict holding ``url``)."""

    model: str | None
    messages: list[dict]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False

    def sampling(self) -> dict:
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                    repetition_penalty=self.repetition_penalty, seed=self.seed)

    def image_urls(self) -> list[str]:
        return [p["image_url"]["url"] for m in self.messages if isinstance(m["content"], list)
                for p in m["content"] if p["type"] == "image_url"]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(body: dict, name: str, default, lo=None, hi=None, lo_open=False, integer=False):
    v = body.get(name)
    if v is None:
        return default
    if integer:
        if not isinstance(v, int) or isinstance(v, bool):
            raise _err(f"'{name}' must be an integer (got {v!r})", name)
    elif not _is_number(v) or not math.isfinite(v):
        raise _err(f"'{name}' must be a finite number (got {v!r})", name)
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise _serr(f"'{name}' must be in {rng} (got {v!r})", name)
    return v


def _check_part(part: Any, where: str) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise _err(f"{where} must be an object with a 'type' (text or image_url)", where)
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise _err(f"{where}.text must be a string", f"{where}.text")
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        img = part.get("image_url")
        if isinstance(img, str):
            img = {"url": img}
        if not isinstance(img, dict) or not isinstance(img.get("url"), str) or not img["url"]:
            raise _err(f"{where}.image_url must be an object with a non-empty 'url' string", f"{where}.image_url")
        return {"type": "image_url", "image_url": {"url": img["url"]}}
    raise _err(f"{where} has unsupported type {kind!r}; use 'text' or 'image_url'", f"{where}.type")


def _check_messages(messages: Any) -> list[dict]:
    if messages is None:
        raise _err("'messages' is required: a list of {role, content} objects", "messages")
    if not isinstance(messages, list) or not messages:
        raise _err("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _err(f"{where} must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if role not in ROLES:
            raise _err(f"{where}.role must be one of {', '.join(ROLES)} (got {role!r})", f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            pass
        elif isinstance(content, list):
            content = [_check_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
            if role != "user" and any(p["type"] != "text" for p in content):
                raise _err(f"{where}: only user messages can hold images", f"{where}.content")
            if all(p["type"] == "text" for p in content):  # plain text parts: join like OpenAI does
                content = "".join(p["text"] for p in content)
        else:
            raise _err(f"{where}.content must be a string or a list of parts", f"{where}.content")
        _check_text(content, f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _check_text(content, where: str) -> None:
    """Text a tokenizer can take: JSON's "\\ud83d" alone decodes to a lone surrogate, which is not Unicode."""
    texts = [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _err(f"{where} holds an unpaired UTF-16 surrogate at character {e.start}; send valid Unicode",
                       where) from None


def parse_chat_request(body: Any) -> ChatRequest:
    """Check an OpenAI chat-completions request body; raises RequestError / SamplingError (with ``.param``)."""
    if not isinstance(body, dict):
        raise _err("the request body must be a JSON object", "body")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _err("'model' must be a string", "model")
    messages = _check_messages(body.get("messages"))
    n = body.get("n")
    if n not in (None, 1):
        raise _err(f"only n=1 is supported (got {n!r})", "n")
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(name):
            raise _err(f"'{name}' is not supported by this server", name)
    if body.get("logprobs"):
        raise _err("'logprobs' is not supported by this server", "logprobs")
    fmt = body.get("response_format")
    if fmt not in (None, {}) and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _err("only response_format {'type': 'text'} is supported", "response_format")
    for name in ("frequency_penalty", "presence_penalty"):
        v = _number(body, name, 0, -2, 2)
        if v != 0:
            raise _err(f"'{name}' is not supported (use 'repetition_penalty' instead)", name)

    max_tokens = _number(body, "max_completion_tokens", None, lo=1, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", None, lo=1, integer=True)
    temperature = _number(body, "temperature", 1.0, 0, 2)
    top_p = _number(body, "top_p", 1.0, 0, 1, lo_open=True)
    top_k = _number(body, "top_k", 0, 0, integer=True)
    min_p = _number(body, "min_p", 0.0, 0, 1)
    rep = _number(body, "repetition_penalty", 1.0, 0, lo_open=True)
    seed = _number(body, "seed", None, lo=0, hi=2 ** 63 - 1, integer=True)

    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _err("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise _err(f"'stop' takes at most {MAX_STOP_STRINGS} strings (got {len(stop)})", "stop")
    for s in stop:
        _check_text(s, "stop")

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _err("'stream' must be true or false", "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise _err("'stream_options' must be an object", "stream_options")
        if not stream:
            raise _err("'stream_options' is only allowed with stream=true", "stream_options")
        include_usage = bool(opts.get("include_usage", False))
    return ChatRequest(model=model, messages=messages, max_tokens=max_tokens, temperature=float(temperature),
                       top_p=float(top_p), top_k=int(top_k), min_p=float(min_p), repetition_penalty=float(rep),
                       seed=seed, stop=[s for s in stop if s], stream=stream, include_usage=include_usage)


# --- response objects ----------------------------------------------------------------------------------

class OpenAIObject:
    """A JSON object with attribute access (nested dicts become OpenAIObjects, lists are converted too)."""

    def __init__(self, data: dict):
        object.__setattr__(self, "_data", data)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        # like the openai package's models: an optional field that is absent reads as None
        return _wrap(self._data.get(name))

    def __getitem__(self, name):
        return _wrap(self._data[name])

    def __contains__(self, name):
        return name in self._data

    def model_dump(self) -> dict:
        return self._data

    to_dict = model_dump

    def __eq__(self, other):
        return isinstance(other, OpenAIObject) and other._data == self._data

    def __repr__(self):
        return f"{type(self).__name__}({self._data!r})"


def _wrap(v):
    if isinstance(v, dict):
        return OpenAIObject(v)
    if isinstance(v, list):
        return [_wrap(x) for x in v]
    return v


class ChatCompletion(OpenAIObject):
    pass


class ChatCompletionChunk(OpenAIObject):
    pass


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int, created: int | None = None, extra: dict | None = None) -> ChatCompletion:
    """``extra``: pocketvlm's own facts about the answer (an assistant's image descriptions), under "pocketvlm"."""
    return ChatCompletion({
        "id": cid, "object": "chat.completion", "created": created or int(time.time()), "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
        **({"pocketvlm": extra} if extra is not None else {}),
    })


def chunk(cid: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None,
          usage_: dict | None = None, include_usage: bool = False, extra: dict | None = None) -> ChatCompletionChunk:
    """One streamed chunk; ``delta=None`` makes the usage-only chunk (empty ``choices``). ``extra``: as in
    :func:`completion` (sent on the first chunk, so a client can show an assistant's description first)."""
    d = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
         "system_fingerprint": None,
         "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                               "finish_reason": finish_reason}]}
    if include_usage:
        d["usage"] = usage_
    if extra is not None:
        d["pocketvlm"] = extra
    return ChatCompletionChunk(d)


def model_list(ids_and_info: list[tuple[str, dict]], created: int) -> dict:
    return {"object": "list", "data": [
        {"id": mid, "object": "model", "created": created, "owned_by": "pocketvlm", **extra}
        for mid, extra in ids_and_info]}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
