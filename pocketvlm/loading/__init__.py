"""One loading pipeline for every family and source.

source -> (HF folder | GGUF file | package folder) -> config dict -> family module (registry) -> build on the
meta device -> ``sanitize(weights)`` -> strict load that checks every key and shape -> tie weights ->
device/dtype. A GGUF file loaded with a quantization mode is streamed instead: checked against the meta model
first, then read tensor by tensor, each layer quantized as soon as it is complete (see :func:`load_gguf`).

- :mod:`.sources`: what a source string names (a local Hugging Face folder, a ``.gguf`` file, a hub repo id);
- :mod:`.hf`: ``config.json``, the image processor's settings, ``*.safetensors`` through safetensors' mmap;
- :mod:`.gguf` and :mod:`.gguf_file`: llama.cpp files (metadata, tensors, streaming quantization);
- :mod:`.mmproj`: a llama.cpp VLM's second file (vision tower + projector) joined to its language model;
- :mod:`.package` and :mod:`.package_files`: pocketvlm package folders (``manifest.json``);
- :mod:`.processors`: the tokenizer and image preprocessing of a loaded model;
- :mod:`.core`: :class:`Loaded` and the strict build every source ends in.

Built-in real model names are resolved a layer above (:func:`pocketvlm.real_models.resolve_source`), since
building one (``pocketvlm-scenes``) loads its parts through this package.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .core import DTYPES, Loaded, build, check_weights, kv_cache_dtype_for, meta_model, parse_dtype
from .gguf import gguf_metadata, gguf_reader, gguf_tensor_to_torch, load_gguf, map_gguf_names
from .hf import image_processor_dict, load_hf, read_config, read_safetensors, safetensors_files
from .package import build_skeleton, is_package, load_package, scale_keys
from .processors import load_image_processor, load_tokenizer
from .sources import download, resolve

__all__ = ["DTYPES", "Loaded", "build", "build_skeleton", "check_weights", "download", "gguf_metadata",
           "gguf_reader", "gguf_tensor_to_torch", "image_processor_dict", "is_package", "kv_cache_dtype_for",
           "load", "load_gguf", "load_hf", "load_image_processor", "load_package", "load_tokenizer",
           "map_gguf_names", "meta_model", "parse_dtype", "read_config", "read_safetensors", "resolve",
           "safetensors_files", "scale_keys"]


def load(source, *, device="cpu", dtype=torch.float32, max_seq_len: int | None = None,
         quantization: str | None = None, verify: bool = False, mmproj=None) -> Loaded:
    """Load any supported source; a pocketvlm package folder (``manifest.json``) is checked against its
    manifest (file sizes; sha256 too with ``verify``) and loaded with its recorded quantization.
    ``mmproj``: a llama.cpp mmproj file that makes a GGUF language model a VLM (:mod:`.mmproj`)."""
    dtype = parse_dtype(dtype)
    if mmproj is not None:
        kind, path = resolve(source)
        if kind != "gguf":
            from ..errors import ConfigError

            raise ConfigError(f"mmproj goes with a .gguf language model; {source} is a {kind} source")
        from .mmproj import load_gguf_vlm

        return load_gguf_vlm(path, Path(mmproj), device=device, dtype=dtype, max_seq_len=max_seq_len,
                             quantization=quantization)
    if is_package(source):
        loaded = load_package(source, device=device, dtype=dtype, max_seq_len=max_seq_len, verify=verify)
        recorded = (loaded.quantization or {}).get("mode")
        if quantization and quantization != recorded:
            from ..errors import QuantizationError

            raise QuantizationError(f"{source} is a package already quantized as {recorded!r}; "
                                    f"convert the original model to get {quantization!r}")
        return loaded
    kind, path = resolve(source)
    if kind == "gguf":  # quantized module by module while the file is read
        return load_gguf(path, device=device, dtype=dtype, max_seq_len=max_seq_len, quantization=quantization)
    if quantization == "gguf":
        from ..errors import QuantizationError

        raise QuantizationError("quantization 'gguf' (keep the file's own quantized blocks) needs a .gguf source")
    loaded = load_hf(path, device=device, dtype=dtype, max_seq_len=max_seq_len)
    if quantization:
        from ..quant import quantize_model

        loaded.quantization = {"mode": quantization,
                               "modules": quantize_model(loaded.model, quantization, embeddings=True)}
    return loaded
