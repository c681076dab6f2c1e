"""Exceptions pocketvlm raises for bad input. Each says what was wrong and what to do about it.

All derive from :class:`PocketVLMError`, so callers (CLI, server) can turn any of them into a
one-line message; the subclasses also derive from the matching built-in where one fits.
"""


class PocketVLMError(Exception):
    """Base class of every error pocketvlm raises on purpose."""


class ModelNotFoundError(PocketVLMError, FileNotFoundError):
    """A model path, folder or hub id that does not exist or cannot be reached."""


class ConfigError(PocketVLMError, ValueError):
    """A missing or malformed config.json, or a config missing a required key."""


class UnsupportedArchitectureError(PocketVLMError, ValueError):
    """An architecture (HF model_type or GGUF general.architecture) pocketvlm does not implement."""


class CorruptWeightsError(PocketVLMError, ValueError):
    """A truncated, tampered or malformed weight file (safetensors or GGUF)."""


class TemplateError(PocketVLMError, ValueError):
    """An unknown chat template name, or a template that fails to render."""


class ContextWindowError(PocketVLMError, ValueError):
    """A prompt (text plus image tokens) longer than the context window."""


class SamplingError(PocketVLMError, ValueError):
    """Invalid sampling parameters (negative temperature, top_p outside (0, 1], ...)."""


class ImageError(PocketVLMError, ValueError):
    """An image that cannot be used: missing, not an image, truncated, too large, too small."""


class QuantizationError(PocketVLMError, ValueError):
    """An unknown quantization mode or a layer that cannot be quantized as asked."""


class PackageError(PocketVLMError, ValueError):
    """A packaged model folder or package config that is incomplete, tampered or inconsistent."""


class DeviceError(PocketVLMError, ValueError):
    """An unknown device name or a device value that cannot be used."""


class RequestError(PocketVLMError, ValueError):
    """A malformed chat request: missing or mistyped fields, unsupported options (server and Engine API)."""


class AssistantError(PocketVLMError, ValueError):
    """An assistant (vision model + chat model) that cannot work as defined."""


class ImageTooLargeError(ImageError):
    """An image over the configured byte or pixel limit (the server answers 413)."""


class ServerBusyError(PocketVLMError, RuntimeError):
    """Too many requests already waiting for a model (the server answers 503); retry later."""


class DataError(PocketVLMError, ValueError):
    """A malformed evaluation data file: bad JSON, a missing field, an unknown kind, a missing image."""


class DependencyError(PocketVLMError, ImportError):
    """An optional dependency that a feature needs is not installed (the message names the extra)."""
