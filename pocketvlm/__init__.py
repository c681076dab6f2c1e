"""pocketvlm: small vision-language models on the machines people carry.

    import pocketvlm
    model = pocketvlm.load()                       # embedded default: Qwen2.5-Coder-0.5B-Instruct
    model.chat([{"role": "user", "content": "Hi!"}])
"""
from .errors import PocketVLMError
from .version import __version__  # noqa: F401


def load(*args, **kwargs):
    """See :func:`pocketvlm.api.load`; an assistant definition (``.json``) gives a :class:`pocketvlm.Assistant`."""
    from .assistant import load_any

    return load_any(*args, **kwargs)


def __getattr__(name):  # lazy: importing pocketvlm stays cheap (no torch import until needed)
    if name == "Engine":
        from .serve.engine import Engine

        return Engine
    if name == "Assistant":
        from .assistant import Assistant

        return Assistant
    if name == "PocketModel":
        from .api import PocketModel

        return PocketModel
    raise AttributeError(name)


__all__ = ["load", "PocketVLMError", "Engine", "PocketModel", "Assistant", "__version__"]
