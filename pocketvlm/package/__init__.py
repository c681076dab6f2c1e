"""Packages: converted, quantized model folders (``convert``), bundles of them for a device
(``package``), the memory estimate (``estimate_memory``) and device fit checks (``fit``).

    from pocketvlm.package import convert, load_package, estimate_memory
    convert("qwen2.5-coder-0.5b-instruct", "q4f16_1", "qwen-q4")   # -> folder with manifest.json
    loaded = load_package("qwen-q4", verify=True)                  # sha256 of every file checked

CLI: ``pocketvlm convert SOURCE -q MODE -o DIR``, ``pocketvlm package CONFIG.json -o DIR``,
``pocketvlm fit MODEL... --device NAME``.
"""
from .bundle import package
from .cli import register_cli
from .convert import convert, is_package, load_package
from .devices import DEVICES, Device, get_device
from .memory import estimate_memory, estimate_package, estimate_source, params_estimate

__all__ = ["convert", "load_package", "is_package", "package", "estimate_memory", "estimate_package",
           "estimate_source", "params_estimate", "DEVICES", "Device", "get_device", "register_cli",
           "load_package_model"]


def load_package_model(folder, *, device="cpu", dtype="float32", context_window_size=None,
                       prefill_chunk_size: int = 512, verify: bool = False, template=None,
                       vision_precision: str = "auto"):
    """A :class:`pocketvlm.api.PocketModel` from a package folder (what ``pocketvlm.load(folder)`` does
    once loading.py routes package folders here), the vision tower at ``vision_precision`` as there."""
    from ..api import PocketModel, load_image_processor, load_tokenizer
    from ..quant.vision_fast import apply_vision_precision

    loaded = load_package(folder, device=device, dtype=dtype, max_seq_len=context_window_size, verify=verify)
    vision = apply_vision_precision(loaded.model, vision_precision)
    proc = None
    if hasattr(loaded.model, "encode_images"):
        proc = load_image_processor(loaded)
    return PocketModel(loaded, load_tokenizer(loaded), template=template, context_window_size=context_window_size,
                       prefill_chunk_size=prefill_chunk_size, image_processor=proc, vision_precision=vision)
