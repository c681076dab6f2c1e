"""Config plumbing shared by every family: frozen dataclasses built from a Hugging Face ``config.json`` dict."""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from ..errors import ConfigError

C = TypeVar("C")


def from_dict(cls: type[C], d: dict[str, Any], **overrides: Any) -> C:
    """Build the dataclass ``cls`` from ``d``: unknown keys are ignored, missing required keys are a clear error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in fields}
    kw.update(overrides)
    missing = [
        name for name, f in fields.items()
        if name not in kw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        kind = d.get("model_type", cls.__name__)
        raise ConfigError(f"config for {kind!r} lacks required key(s): {', '.join(missing)}")
    # JSON lists become tuples so the frozen configs stay hashable and immutable.
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    return cls(**kw)


def rope_parameters(d: dict[str, Any], default_theta: float = 10000.0) -> dict[str, Any]:
    """RoPE settings from either config style: transformers>=5 ``rope_parameters`` or ``rope_theta`` + ``rope_scaling``."""
    if isinstance(d.get("rope_parameters"), dict) and "rope_theta" in d["rope_parameters"]:
        p = dict(d["rope_parameters"])
    else:
        p = dict(d.get("rope_scaling") or {})
        p["rope_theta"] = d.get("rope_theta", default_theta)
    p["rope_type"] = p.get("rope_type", p.get("type", "default")) or "default"
    p.pop("type", None)
    return p
