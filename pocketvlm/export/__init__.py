"""Export a pocketvlm model to llama.cpp's GGUF: ``<name>.gguf`` (language model, tokenizer, chat template)
and, for a LLaVA, ``mmproj-<name>.gguf`` (vision tower and projector), as ``llama-mtmd-cli -m ... --mmproj ...``
takes them (:func:`export_gguf`, ``pocketvlm export gguf``)."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import ConfigError, PocketVLMError, UnsupportedArchitectureError

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")


def export_gguf(source, output, *, type: str = "f16", name: str | None = None, progress: bool = True) -> dict:
    """Write ``source`` (any loadable model: HF folder, GGUF, built-in name) as GGUF files in folder ``output``.

    ``type``: f32, f16, q8_0, q4_0 (written here with the ``gguf`` package; norms, biases and embeddings of
    the tower stay float), or q4_k_m (the f16 file requantized by llama.cpp's own ``llama-quantize``, which
    must be installed). Returns ``{"model": path, "mmproj": path or None, "type": type}``."""
    from tqdm.auto import tqdm

    from ..loading import load, load_image_processor, load_tokenizer
    from ..models.base import VisionLanguageModel
    from ..real_models import resolve_source
    from .gguf_text import add_tensor, check_exportable, text_tensors, write_text_metadata
    from .gguf_vocab import copy_tokenizer_metadata, write_folder_tokenizer

    if type not in TYPES:
        raise ConfigError(f"unknown GGUF export type {type!r}; choose one of {', '.join(TYPES)}")
    name = name or Path(str(source).rstrip("/")).name.removesuffix(".gguf")
    loaded = load(resolve_source(source))  # float weights, as stored (a GGUF source is dequantized)
    model, cfg = loaded.model, loaded.config
    vlm = isinstance(model, VisionLanguageModel)
    if vlm and cfg.model_type not in ("llava", "mobilevlm"):
        raise UnsupportedArchitectureError(
            f"{cfg.model_type!r} has no GGUF export yet: pocketvlm writes llava (CLIP, SigLIP or DINOv2 tower "
            "with an MLP projector), mobilevlm (LDP / LDPv2) and the llama, qwen2, gemma, gemma2, gemma3 and phi3 "
            "language models")
    text_model, text_cfg = (model._text, cfg.text_config) if vlm else (model, cfg)
    if vlm:
        model._sync_text()
        from .gguf_mmproj import check_llava

        check_llava(model)  # refuse before anything is written
    arch = check_exportable(text_cfg)  # refuse what llama.cpp cannot run before anything is written
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    write_type = "f16" if type == "q4_k_m" else type
    model_path = out / f"{name}.gguf"
    mmproj_path = out / f"mmproj-{name}.gguf" if vlm else None
    tok = load_tokenizer(loaded)
    tensors = text_tensors(text_model, text_cfg)
    import gguf

    tmp_dir = tempfile.mkdtemp(dir=out, prefix=".export-")
    try:
        text_tmp = Path(tmp_dir) / model_path.name
        with tqdm(total=len(tensors) + (1 if vlm else 0), desc=f"GGUF {type}", unit="tensor",
                  disable=not progress) as bar:
            w = gguf.GGUFWriter(str(text_tmp), arch)
            write_text_metadata(w, text_cfg, name, write_type)
            if loaded.kind == "gguf" and loaded.gguf_metadata is not None:
                copy_tokenizer_metadata(w, loaded.gguf_metadata)
            else:
                write_folder_tokenizer(w, Path(loaded.path), tok, int(text_cfg.vocab_size), arch)
            for tname, t in tensors:
                add_tensor(w, tname, t, write_type)
                bar.update(1)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            if vlm:
                from .gguf_mmproj import write_mmproj

                proc = load_image_processor(loaded)
                mm_tmp = Path(tmp_dir) / mmproj_path.name
                write_mmproj(mm_tmp, model, proc, name, write_type)
                bar.update(1)
        if type == "q4_k_m":
            text_tmp = _llama_quantize(text_tmp, "Q4_K_M")
        text_tmp.replace(model_path)
        if vlm:
            mm_tmp.replace(mmproj_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return {"model": model_path, "mmproj": mmproj_path, "type": type}


def _llama_quantize(src: Path, qtype: str) -> Path:
    from .llamacpp import binary

    exe = binary("llama-quantize")
    if exe is None:
        raise PocketVLMError(
            f"--type {qtype.lower()} is written by llama.cpp's llama-quantize, which was not found: put it on PATH "
            "or set POCKETVLM_LLAMA_CPP_BIN to its folder (bash benchmarks/build_llamacpp.sh builds it), or "
            "export with --type q8_0 / q4_0")
    dst = src.with_name(src.stem + f"-{qtype}.gguf")
    r = subprocess.run([str(exe), str(src), str(dst), qtype], capture_output=True, text=True)
    if r.returncode != 0:
        raise PocketVLMError(f"llama-quantize failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return dst
