"""An assistant definition (:class:`AssistantConfig`): the JSON file's fields and the keyword arguments of
:class:`pocketvlm.assistant.Assistant`, readable without loading any model (``pocketvlm fit`` estimates one)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import AssistantError, ConfigError

DEFAULT_DESCRIBE_PROMPT = ("Describe this image in detail and factually: the objects, their colours, shapes, "
                           "positions and any text. The user asks: {question}")
DEFAULT_CONTEXT_TEMPLATE = (
    "You cannot see images yourself. A vision model looked at the image(s) the user sent and reported what it "
    "saw, image by image:\n{descriptions}\nAnswer the user from this report. If the report does not say, say "
    "that you cannot tell from the picture.")
DEFAULT_VISION_OPTIONS = {"temperature": 0, "max_tokens": 96}
MEMORY_POLICIES = ("resident", "sequential")
SAMPLING_KEYS = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop"}


class AssistantWarning(UserWarning):
    """Something the assistant changed to make a request fit (a description cut short)."""


@dataclass
class AssistantConfig:
    """An assistant definition: the JSON file's fields and :class:`Assistant`'s keyword arguments.

    ``vision`` / ``chat``: model sources (path, built-in name, hub id; in a JSON file relative paths are
    taken from the file's folder). ``describe_prompt``: what the VLM is asked, ``{question}`` replaced by the
    text of the user message the image came in. ``context_template``: the system-side block the chat model
    reads, ``{descriptions}`` replaced by the labelled descriptions. ``vision_options`` / ``chat_options``:
    generation options (``max_tokens``, ``temperature``, ``top_p``, ...) of each model; a call's own options
    override ``chat_options``. ``vision_load`` / ``chat_load``: options of :func:`pocketvlm.load` for each model.
    ``memory``: ``resident`` or ``sequential``."""

    vision: str
    chat: str
    describe_prompt: str = DEFAULT_DESCRIBE_PROMPT
    context_template: str = DEFAULT_CONTEXT_TEMPLATE
    vision_options: dict = field(default_factory=lambda: dict(DEFAULT_VISION_OPTIONS))
    chat_options: dict = field(default_factory=dict)
    vision_load: dict = field(default_factory=dict)
    chat_load: dict = field(default_factory=dict)
    memory: str = "resident"
    name: str | None = None

    def __post_init__(self):
        if self.memory not in MEMORY_POLICIES:
            raise ConfigError(f"memory must be one of {', '.join(MEMORY_POLICIES)} (got {self.memory!r})")
        for key in ("describe_prompt", "context_template"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                raise ConfigError(f"{key} must be a non-empty string")
        if "{descriptions}" not in self.context_template:
            raise ConfigError("context_template must contain {descriptions} (where the descriptions go)")
        for key in ("vision_options", "chat_options"):
            bad = set(getattr(self, key)) - SAMPLING_KEYS
            if bad:
                raise ConfigError(f"{key}: unknown option(s) {', '.join(sorted(bad))}; "
                                  f"known: {', '.join(sorted(SAMPLING_KEYS))}")
        self.vision_options = {**DEFAULT_VISION_OPTIONS, **self.vision_options}

    @classmethod
    def from_dict(cls, d: dict, base: Path | None = None) -> AssistantConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"an assistant definition is a JSON object, got {type(d).__name__}")
        d = dict(d.get("assistant", d))  # {"assistant": {...}} or the fields themselves
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown assistant field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        missing = [k for k in ("vision", "chat") if not d.get(k)]
        if missing:
            raise ConfigError(f"an assistant needs {' and '.join(missing)} (model sources)")
        if base is not None:  # relative paths are relative to the definition file
            for k in ("vision", "chat"):
                p = base / str(d[k])
                if not Path(str(d[k])).is_absolute() and p.exists():
                    d[k] = str(p)
        return cls(**d)

    @classmethod
    def from_file(cls, path) -> AssistantConfig:
        path = Path(path).expanduser()
        try:
            d = json.loads(path.read_text())
        except OSError as e:
            raise AssistantError(f"cannot read the assistant definition {str(path)!r}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        cfg = cls.from_dict(d, base=path.parent)
        cfg.name = cfg.name or path.stem
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


def is_assistant_file(source) -> bool:
    """True for a ``.json`` file that holds an assistant definition (what :func:`load_any` loads as one)."""
    p = Path(str(source)).expanduser()
    return p.suffix.lower() == ".json" and p.is_file()
