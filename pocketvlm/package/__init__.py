"""Packages: converted, quantized model folders (``convert``), bundles of them for a device
(``package``), the memory estimate (``estimate_memory``) and device fit checks (``fit``).

    from pocketvlm.package import convert, estimate_memory
    convert("qwen2.5-coder-0.5b-instruct", "q4f16_1", "qwen-q4")   # -> folder with manifest.json
    model = pocketvlm.load("qwen-q4", verify=True)                 # sha256 of every file checked

Reading a package back is loading's job (:mod:`pocketvlm.loading.package`); ``load_package`` and
``is_package`` are re-exported here.

CLI: ``pocketvlm convert SOURCE -q MODE -o DIR``, ``pocketvlm package CONFIG.json -o DIR``,
``pocketvlm fit MODEL... --device NAME``.
"""
from .bundle import package
from .cli import register_cli
from ..loading.package import is_package, load_package
from .convert import convert
from .devices import DEVICES, Device, get_device
from .memory import estimate_memory, estimate_package, estimate_source, params_estimate

__all__ = ["convert", "load_package", "is_package", "package", "estimate_memory", "estimate_package",
           "estimate_source", "params_estimate", "DEVICES", "Device", "get_device", "register_cli"]
