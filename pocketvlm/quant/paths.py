"""Which CPU code multiplies a quantized layer (:meth:`.linear.QuantLinear.forward`), chosen by what the CPU has and
by the number of input rows. Each choice is a module-level setting: ``None`` picks for this CPU at first use, a
value forces one (tests and benchmarks do).

* fewer than :func:`own_kernel_max_tokens` rows (decode, short prompts): the own matrix-vector kernel
  (``csrc/matvec_q4.cpp``...), activations quantized per 32 values to int8 (:data:`OWN_KERNEL_ACT`);
* rows in :func:`prefill_int8_rows` (rows8 layers: 4-, 5- and 8-bit codes): the int8 prefill GEMM
  (``csrc/gemm_q4.cpp``);
* otherwise the dense path: the weight dequantized to :func:`cpu_dense_dtype` and one ``F.linear`` GEMM.
"""
from __future__ import annotations

import torch

from . import cpu_kernel

#: Rows below which a CPU input runs the own kernel (its time grows with the row count, a GEMM's barely): from
#: there the dense path is faster (benchmarks/quant_kernels.py sweeps it, 4864 x 896 q4f16_1, 2 threads: with AVX-512 VNNI
#: own/dense 0.72/1.42 ms at 32 rows, 1.45/1.60 at 64, 2.92/1.85 at 128; with AVX2 only the crossover is near 40).
#: None: chosen for this CPU at first use (:func:`own_kernel_max_tokens`); set it to force one.
OWN_KERNEL_MAX_TOKENS: int | None = None
OWN_KERNEL_MAX_TOKENS_AVX2, OWN_KERNEL_MAX_TOKENS_VNNI = 16, 64


def own_kernel_max_tokens() -> int:
    """:data:`OWN_KERNEL_MAX_TOKENS`, chosen for this CPU the first time (64 with AVX-512 VNNI, else 16)."""
    global OWN_KERNEL_MAX_TOKENS
    if OWN_KERNEL_MAX_TOKENS is None:
        vnni = cpu_kernel.available() and bool(cpu_kernel._ops.i8_vnni())
        OWN_KERNEL_MAX_TOKENS = OWN_KERNEL_MAX_TOKENS_VNNI if vnni else OWN_KERNEL_MAX_TOKENS_AVX2
    return OWN_KERNEL_MAX_TOKENS


def dense_from_tokens(device: str | torch.device = "cpu") -> int:
    """The row count from which a ``QuantLinear`` on ``device`` takes the dense path (dequantized weight + GEMM):
    :func:`own_kernel_max_tokens` on a CPU where the own kernel built, else 0 (always dense)."""
    if torch.device(device).type != "cpu" or not cpu_kernel.available():
        return 0
    return own_kernel_max_tokens()


#: Activations in the own kernel: "int8" (quantized per 32 values, as llama.cpp does; fast) or "fp32" (exact).
OWN_KERNEL_ACT = "int8"

#: Rows [lo, hi) of an input that a rows8 layer (4-, 5-, 8-bit) on CPU multiplies with the int8 prefill GEMM
#: (``csrc/gemm_q4.cpp``: the codes against x quantized per 32 values, decode's own arithmetic, AVX-512 VNNI)
#: instead of the own kernel (fewer rows) or the dense path (more). Measured on the 2-core Xeon of 2026-12-04 (2
#: threads, 4864 x 896): the GEMM beats the own kernel from ~12 rows (16: 0.26 vs 0.35 ms, 64: 0.79 vs 1.43) and
#: oneDNN's bf16 GEMM on AMX up to ~192 rows (128: 1.46 vs 1.98 ms; 512: 6.1 vs 3.2); without AMX nothing beats
#: it (~670 GOP/s, where bf16 reached ~240 GFLOP/s on a Zen 4). None: chosen for this CPU at first use
#: (:func:`prefill_int8_rows`); set it to force a range ((0, 0): never).
PREFILL_INT8_ROWS: tuple[int, int] | None = None
PREFILL_INT8_MIN_ROWS, PREFILL_INT8_MAX_ROWS_AMX = 16, 192


def prefill_int8_rows() -> tuple[int, int]:
    """:data:`PREFILL_INT8_ROWS`, chosen the first time: from 16 rows on CPUs with AVX-512 VNNI (below 192 where AMX
    runs the bf16 GEMM faster), never elsewhere."""
    global PREFILL_INT8_ROWS
    if PREFILL_INT8_ROWS is None:
        if cpu_kernel.available() and bool(cpu_kernel._ops.i8_vnni()):
            amx = "amx_bf16" in cpu_kernel.cpu_flags()
            PREFILL_INT8_ROWS = (PREFILL_INT8_MIN_ROWS, PREFILL_INT8_MAX_ROWS_AMX if amx else 1 << 62)
        else:
            PREFILL_INT8_ROWS = (0, 0)
    return PREFILL_INT8_ROWS


def cpu_dense_dtype() -> torch.dtype:
    """bfloat16 where this CPU multiplies bf16 natively, else float32 (the dense prefill path on CPU)."""
    return torch.bfloat16 if cpu_kernel.cpu_has_native_bf16() else torch.float32
