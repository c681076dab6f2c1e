"""pocketvlm's own CPU kernels (C++ in ``csrc/``), built on first use, and the Python side of their layouts.

Decode is memory-bound: these kernels stream ~4.5 bits per weight (q4f16_1) at close to the memory bandwidth,
where PyTorch's CPU int4 and bf16 matmuls are slow on CPUs without AVX-512/AMX. The weight layouts
(``rows8`` and ``rows`` for 4-bit codes, a 5-bit ``rows8``, and the 8-bit ones) are described once, in
``csrc/kernels.h``; :func:`pack_q4`, :func:`pack_q5` and :func:`pack_q8` write them, the ``unpack_*`` and
``dequantize_*`` functions read them back.

* Activations (``act``): ``"int8"`` (llama.cpp-style, x quantized per 32 values; the only error is that rounding,
  ~0.3-0.5 % of ``|y|``'s RMS on random data) or ``"fp32"`` (exact, ~1e-6 relative to dequantize + matmul).
* ``M > 1`` rows of x are handled inside the kernel (good for small M); long prefills take the dense path
  (``quant.linear``).
* Threads: rows are split over torch's intra-op threads, chunks claimed dynamically; small matrices run on the
  calling thread. On an oversubscribed machine set ``OMP_WAIT_POLICY=passive`` before torch starts.
* Build: the C++ files are compiled once per (sources, torch version, flags) with the system C++ compiler
  (``$CXX`` or ``c++``) into the torch extensions cache and loaded with ``torch.ops.load_library`` (no ninja, no
  pybind); the ops are ``torch.ops.pocketvlm.*``. x86 CPUs with AVX2 get ``-mavx2 -mfma -mf16c``, the AVX-512
  paths are chosen at run time, other CPUs get portable scalar loops. If no compiler is present or the build
  fails, :func:`available` returns False (one warning) and the functions here fall back to PyTorch.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import QuantizationError

GROUP = 32
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = tuple(sorted(_CSRC.glob("*.cpp")))  # one library (kernels.h says which file does what)
_HEADERS = tuple(sorted(_CSRC.glob("*.h")))
_lock = threading.Lock()
_state: dict = {"tried": False, "ok": False, "error": None, "path": None}
_ops = torch.ops.pocketvlm  # resolves its ops once the library is loaded


class Q4Weight(NamedTuple):
    """The tensors the kernel reads (see the module docstring for the layout)."""

    packed: torch.Tensor  # uint8 [N, K/2] ("rows"), [N/8, K/32, 128] ("rows8") or [N/8, K/32, 160] (5-bit)
    scales: torch.Tensor  # float16|float32 [N, K/32] or [N/8, K/32, 8]
    biases: torch.Tensor | None  # like scales, or None (symmetric)
    offset: float  # used only when biases is None


# ----- build ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read)."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def cpu_has_native_bf16() -> bool:
    """AVX-512-BF16 or AMX-BF16: where PyTorch's bf16 GEMM beats fp32 (the prefill and vision bf16 paths)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def _simd_flags() -> list[str]:
    """AVX2/FMA/F16C flags when this x86 CPU has all three (checked at run time), else none."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return []
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch: read /proc/cpuinfo instead
        cap = ""
    if cap in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma", "-mf16c"]
    return ["-mavx2", "-mfma", "-mf16c"] if {"avx2", "fma", "f16c"} <= cpu_flags() else []


def _build_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    try:
        from torch.utils.cpp_extension import get_default_build_root
        return Path(get_default_build_root())
    except Exception:  # noqa: BLE001
        return Path.home() / ".cache" / "torch_extensions"


def _compile_command(cxx: str, out: Path) -> list[str]:
    import torch.utils.cpp_extension as ext

    inc = [f"-I{p}" for p in ext.include_paths()]
    libdirs = ext.library_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        cxx, "-O3", "-std=c++20", "-fPIC", "-shared", "-fopenmp", *_simd_flags(),
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *inc, *map(str, _SOURCES),
        *[f"-L{d}" for d in libdirs], *[f"-Wl,-rpath,{d}" for d in libdirs], "-lc10", "-ltorch_cpu",
        "-o", str(out),
    ]


def _build() -> Path:
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r}) on PATH")
    key = hashlib.sha256(
        b"".join(p.read_bytes() for p in (*_SOURCES, *_HEADERS)) + " ".join([torch.__version__, sys.version, cxx, *_simd_flags()]).encode()
    ).hexdigest()[:16]
    d = _build_root() / "pocketvlm_kernels"
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"pocketvlm_kernels_{key}.so"
    if out.exists():
        return out
    # build to a private name and rename: concurrent processes never load a half-written library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=d)
    os.close(fd)
    try:
        r = subprocess.run(_compile_command(cxx, Path(tmp)), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {', '.join(p.name for p in _SOURCES)} failed:\n{r.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def available() -> bool:
    """Whether the compiled kernel is usable; builds it (once per process, cached on disk) on first
    call. Never raises: on failure warns once and returns False."""
    if _state["tried"]:
        return _state["ok"]
    with _lock:
        if not _state["tried"]:
            try:
                path = _build()
                if not hasattr(torch.ops.pocketvlm, "q4_linear"):
                    torch.ops.load_library(str(path))
                _state.update(ok=True, path=str(path))
            except Exception as e:  # noqa: BLE001 - any build/load problem means "use the fallback"
                _state.update(ok=False, error=str(e))
                warnings.warn(f"pocketvlm: CPU kernels unavailable, using the slower PyTorch paths ({e})",
                              RuntimeWarning, stacklevel=2)
            _state["tried"] = True
    return _state["ok"]


def simd() -> bool:
    """Whether the loaded kernel was compiled with AVX2 (False also when it is not available)."""
    return available() and bool(torch.ops.pocketvlm.simd())


# ----- packing (pure PyTorch) ---------------------------------------------------------------------
def _pack_scales(fn: str, scales: torch.Tensor, biases: torch.Tensor | None, n: int, g: int, dtype: torch.dtype):
    """pack_q4 / pack_q8's scales and biases: checked ``[N, K/32]``, stored in ``dtype`` on the CPU, finite."""
    if dtype not in (torch.float16, torch.float32):
        raise QuantizationError(f"{fn}: scale dtype must be float16 or float32, got {dtype}")
    for name, t in (("scales", scales), ("biases", biases)):
        if t is not None and tuple(t.shape) != (n, g):
            raise QuantizationError(f"{fn}: {name} must be [N, K/32] = {(n, g)}, got {tuple(t.shape)}")
    s = scales.to(device="cpu", dtype=dtype).contiguous()
    b = None if biases is None else biases.to(device="cpu", dtype=dtype).contiguous()
    for name, t in (("scales", s), ("biases", b)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise QuantizationError(f"{fn}: {name} are not finite in {dtype} (overflow?); use dtype=torch.float32")
    return s, b


def _check_codes(fn: str, codes: torch.Tensor, lo: int, hi: int) -> None:
    """pack_q4 / pack_q5 / pack_q8's codes: an integer ``[N, K]`` tensor, ``K % 32 == 0``, values lo..hi."""
    if codes.dim() != 2 or codes.shape[1] % GROUP:
        raise QuantizationError(f"{fn}: codes must be [N, K] with K a multiple of {GROUP} (pad K), "
                                f"got {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex():
        raise QuantizationError(f"{fn}: codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise QuantizationError(f"{fn}: codes must lie in {lo}..{hi}")


def pack_q4(codes: torch.Tensor, scales: torch.Tensor, offset: float = 7.0, biases: torch.Tensor | None = None,
            dtype: torch.dtype = torch.float16, layout: str = "auto") -> Q4Weight:
    """codes ``[N, K]`` (ints 0..15), scales ``[N, K/32]``, optional biases ``[N, K/32]`` -> :class:`Q4Weight`.

    ``W = (q - offset) * scale`` without biases, ``W = q * scale + bias`` with them. ``dtype``
    (float16 or float32) is the stored scale/bias dtype; float16 reads 0.5 bit/weight less.
    ``layout``: ``"rows8"``, ``"rows"`` or ``"auto"`` (rows8 when ``N % 8 == 0``; see the module docstring).
    """
    if layout not in ("auto", "rows", "rows8"):
        raise QuantizationError(f"pack_q4: layout must be 'auto', 'rows' or 'rows8', got {layout!r}")
    _check_codes("pack_q4", codes, 0, 15)
    n, k = codes.shape
    g = k // GROUP
    if layout == "rows8" and n % 8:
        raise QuantizationError(f"pack_q4: the rows8 layout needs N % 8 == 0, got N = {n}")
    s, b = _pack_scales("pack_q4", scales, biases, n, g, dtype)
    if layout == "rows8" or (layout == "auto" and n % 8 == 0 and n > 0):
        packed = _pack_rows8_nibbles(codes, n, g).contiguous()
        s, b = (None if t is None else t.view(n // 8, 8, g).transpose(1, 2).contiguous() for t in (s, b))
        return Q4Weight(packed, s, b, float(offset))
    c = codes.to(device="cpu", dtype=torch.uint8).view(n, g, 2, 16)
    packed = (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(n, k // 2).contiguous()
    return Q4Weight(packed, s, b, float(offset))


def _pack_rows8_nibbles(codes: torch.Tensor, n: int, g: int) -> torch.Tensor:
    """The rows8 bytes ``[N/8, G, 128]`` of ``codes [N, K]`` (values 0..15: no masking here, which would hold
    one more byte per weight while the LM head is repacked)."""
    v = codes.to(device="cpu", dtype=torch.uint8).view(n // 8, 8, g, 4, 2, 4)  # block, row, group, chunk, nibble, j
    return (v[..., 0, :] | (v[..., 1, :] << 4)).permute(0, 2, 3, 1, 4).reshape(n // 8, g, 128)


def pack_q5(codes: torch.Tensor, scales: torch.Tensor, offset: float = 16.0, dtype: torch.dtype = torch.float16,
            code_offset: int = 0) -> Q4Weight:
    """5-bit codes ``[N, K]`` (ints 0..31 after adding ``code_offset``, ``N % 8 == 0``), scales ``[N, K/32]`` ->
    :class:`Q4Weight` in the 5-bit rows8 layout, ``W = (q - offset) * scale`` (GGUF Q5_0: offset 16). Runs on
    the q4 functions. Packed a slice of rows at a time, so a 151936 x 896 table needs no full-size temporaries."""
    if codes.dim() != 2 or codes.shape[1] % GROUP or codes.is_floating_point() or codes.is_complex():
        _check_codes("pack_q5", codes, 0, 31)  # raises the shape / dtype error
    n, k = codes.shape
    if n % 8:
        raise QuantizationError(f"pack_q5: the 5-bit layout is rows8, which needs N % 8 == 0, got N = {n}")
    g = k // GROUP
    s, _ = _pack_scales("pack_q5", scales, None, n, g, dtype)
    packed = torch.empty(n // 8, g, 160, dtype=torch.uint8)
    weights = (1 << torch.arange(8, dtype=torch.uint8)).view(1, 1, 1, 8, 1)
    step = max(8, (1 << 21) // max(1, k) // 8 * 8)  # ~2M codes per slice
    for r0 in range(0, n, step):
        part = codes[r0:r0 + step].to(device="cpu", dtype=torch.int16)
        if code_offset:
            part += code_offset
        _check_codes("pack_q5", part, 0, 31)
        c, m = part.to(torch.uint8), part.shape[0]
        bits = ((c >> 4) & 1).view(m // 8, 8, g, 8, 4)  # block, row, group, t (= i // 4), j (= i % 4)
        out = packed[r0 // 8:(r0 + m) // 8]
        out[..., 128:] = (bits * weights).sum(3, dtype=torch.uint8).permute(0, 2, 1, 3).reshape(m // 8, g, 32)
        out[..., :128] = _pack_rows8_nibbles(c & 15, m, g)
    return Q4Weight(packed, s.view(n // 8, 8, g).transpose(1, 2).contiguous(), None, float(offset))


def is_q5(packed: torch.Tensor) -> bool:
    return packed.dim() == 3 and packed.shape[2] == 160


def _fifth_bits(plane: torch.Tensor) -> torch.Tensor:
    """5-bit plane bytes ``[..., j]`` (j = 0..3 of one row) -> bit 4 of codes ``4t + j`` as ``[..., t, j]``
    (0 or 16): plane byte j holds that bit in its bit t."""
    return ((plane.unsqueeze(-2) >> torch.arange(8, dtype=torch.uint8).view(8, 1)) & 1) << 4


def q4_shape(packed: torch.Tensor) -> tuple[int, int]:
    """``(N, K)`` of a packed q4 weight in either layout."""
    if packed.dim() == 3:
        return packed.shape[0] * 8, packed.shape[1] * GROUP
    return packed.shape[0], packed.shape[1] * 2


def unpack_q4(packed: torch.Tensor) -> torch.Tensor:
    """packed uint8 (either layout) -> codes uint8 ``[N, K]`` (inverse of :func:`pack_q4`'s packing)."""
    if packed.dim() == 3:
        nb, g = packed.shape[:2]
        p = packed[..., :128].reshape(nb, g, 4, 8, 4)  # block, group, chunk, row, j
        codes = torch.stack([p & 15, p >> 4], 4).permute(0, 3, 1, 2, 4, 5).reshape(nb * 8, g * GROUP)
        if is_q5(packed):  # plane byte 4r + j, bit t -> code 4t + j of row r
            plane = packed[..., 128:].reshape(nb, g, 8, 4).permute(0, 2, 1, 3)  # block, row, group, j
            codes = codes | _fifth_bits(plane).reshape(nb * 8, g * GROUP)
        return codes
    n = packed.shape[0]
    p = packed.view(n, -1, 16)
    return torch.stack([p & 15, p >> 4], 2).reshape(n, -1)


def unpack_q4_rows(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Codes uint8 ``[len(rows), K]`` of some rows only (an embedding lookup must not unpack the table)."""
    rows = rows.reshape(-1)
    if packed.dim() == 2:
        return unpack_q4(packed[rows])
    g = packed.shape[1]
    sel = packed[rows // 8]
    r = torch.arange(rows.numel())
    p = sel[..., :128].reshape(-1, g, 4, 8, 4)[r, :, :, rows % 8, :]  # [R, g, chunk, j]
    codes = torch.stack([p & 15, p >> 4], 3).reshape(rows.numel(), g * GROUP)
    if is_q5(packed):
        plane = sel[..., 128:].reshape(-1, g, 8, 4)[r, :, rows % 8, :]  # [R, g, j]
        codes = codes | _fifth_bits(plane).reshape(rows.numel(), g * GROUP)
    return codes


def rows_major(t: torch.Tensor | None) -> torch.Tensor | None:
    """Scales or biases ``[N, K/32]`` from either layout's form."""
    if t is None or t.dim() == 2:
        return t
    return t.transpose(1, 2).reshape(t.shape[0] * 8, t.shape[1])


def dequantize_reference(w: Q4Weight) -> torch.Tensor:
    """Float32 ``[N, K]`` weight in plain PyTorch (the fallback, and the tests' reference)."""
    n, _ = q4_shape(w.packed)
    q = unpack_q4(w.packed).float().view(n, -1, GROUP)
    s = rows_major(w.scales).float().unsqueeze(-1)
    out = q * s + rows_major(w.biases).float().unsqueeze(-1) if w.biases is not None else (q - w.offset) * s
    return out.view(n, -1)


# ----- compute ------------------------------------------------------------------------------------
def dequantize_q4(w: Q4Weight) -> torch.Tensor:
    """Float32 ``[N, K]`` weight (for a dense prefill GEMM); kernel when available, else PyTorch."""
    if available():
        return torch.ops.pocketvlm.q4_dequantize(w.packed, w.scales, w.biases, w.offset)
    return dequantize_reference(w)


def q4_linear(x: torch.Tensor, w: Q4Weight, act: str = "int8", scalar: bool = False) -> torch.Tensor:
    """``x [..., K] @ W.T`` -> float32 ``[..., N]`` (no layer bias: callers add it).

    ``act``: ``"int8"`` (fast, activation-quantized) or ``"fp32"`` (exact). ``scalar=True`` forces the
    portable C++ loops (tests). Without the compiled kernel: dequantize + matmul in PyTorch.
    """
    n, k = q4_shape(w.packed)
    if x.shape[-1] != k or act not in ("int8", "fp32") or x.device.type != "cpu":
        _check_linear_args(x, k, act)
    if not (_state["ok"] or available()):
        return (x.to(torch.float32) @ dequantize_reference(w).t())
    x2 = x.reshape(-1, k)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.to(torch.float32).contiguous()
    y = _ops.q4_linear(x2, w.packed, w.scales, w.biases, w.offset, act == "int8", 1 if scalar else 0)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def q4_gemm(x: torch.Tensor, w: "Q4Weight | Q8Weight", scalar: bool = False) -> torch.Tensor:
    """``x [M, K] @ W.T`` -> float32 ``[M, N]`` for many rows (prefill): a rows8 weight (4-bit, 5-bit or 8-bit
    codes) against x quantized per 32 values, the int8 arithmetic of :func:`q4_linear` / :func:`q8_linear`
    (``csrc/gemm_q4.cpp``). No layer bias."""
    q8 = isinstance(w, Q8Weight)
    packed = w.qweight if q8 else w.packed
    n, k = (q8_shape if q8 else q4_shape)(packed)
    if x.dim() != 2 or x.shape[-1] != k:
        raise QuantizationError(f"q4_gemm: x must be [M, {k}], got {tuple(x.shape)}")
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()
    return _ops.q4_gemm(x, packed, w.scales, w.biases, 0.0 if q8 else w.offset, 1 if scalar else 0)


def gemm_layout(w) -> bool:
    """Whether :func:`q4_gemm` reads this kernel weight: a rows8 layout (4-bit with an integer offset or biases,
    5-bit, 8-bit)."""
    if isinstance(w, Q8Weight):
        return w.qweight.dim() == 3
    return isinstance(w, Q4Weight) and w.packed.dim() == 3 and (w.biases is not None or float(w.offset).is_integer())


def _check_linear_args(x: torch.Tensor, k: int, act: str) -> None:
    if act not in ("int8", "fp32"):
        raise QuantizationError(f"q4_linear: act must be 'int8' or 'fp32', got {act!r}")
    if x.shape[-1] != k:
        raise QuantizationError(f"q4_linear: x has last dim {x.shape[-1]} but the weight has K = {k}; pad x to K")
    if x.device.type != "cpu":
        raise QuantizationError(f"q4_linear is a CPU kernel; x is on {x.device} (use the dense path there)")


# ----- int8 weights -------------------------------------------------------------------------------
class Q8Weight(NamedTuple):
    """int8 weights for :func:`q8_linear`: ``W[n, 32g + i] = qweight * scales[n, g] (+ biases[n, g])``."""

    qweight: torch.Tensor  # int8 [N, K] ("rows", natural order) or [N/8, K/32, 256] ("rows8")
    scales: torch.Tensor  # float16|float32 [N, K/32] or [N/8, K/32, 8]
    biases: torch.Tensor | None  # like scales, or None


def pack_q8(codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor | None = None,
            dtype: torch.dtype = torch.float16, layout: str = "auto") -> Q8Weight:
    """codes ``[N, K]`` (ints -128..127), scales/biases ``[N, K/32]`` -> :class:`Q8Weight`
    (MLC q8f16_1, GGUF Q8_0 as signed codes times a per-32 scale). ``layout``: ``"rows8"``, ``"rows"``
    or ``"auto"`` (rows8 when ``N % 8 == 0``)."""
    if layout not in ("auto", "rows", "rows8"):
        raise QuantizationError(f"pack_q8: layout must be 'auto', 'rows' or 'rows8', got {layout!r}")
    _check_codes("pack_q8", codes, -128, 127)
    n, g = codes.shape[0], codes.shape[1] // GROUP
    if layout == "rows8" and n % 8:
        raise QuantizationError(f"pack_q8: the rows8 layout needs N % 8 == 0, got N = {n}")
    s, b = _pack_scales("pack_q8", scales, biases, n, g, dtype)
    c = codes.to(device="cpu", dtype=torch.int8)
    if layout == "rows8" or (layout == "auto" and n % 8 == 0 and n > 0):
        c = c.view(n // 8, 8, g, 8, 4).permute(0, 2, 3, 1, 4).reshape(n // 8, g, 256)  # block, group, chunk, row, j
        s, b = (None if t is None else t.view(n // 8, 8, g).transpose(1, 2).contiguous() for t in (s, b))
    return Q8Weight(c.contiguous(), s, b)


def q8_shape(qweight: torch.Tensor) -> tuple[int, int]:
    """``(N, K)`` of a q8 weight in either layout."""
    if qweight.dim() == 3:
        return qweight.shape[0] * 8, qweight.shape[1] * GROUP
    return tuple(qweight.shape)


def unpack_q8(qweight: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """int8 codes ``[N, K]`` (or ``[len(rows), K]``) from either q8 layout."""
    if qweight.dim() == 2:
        return qweight if rows is None else qweight[rows.reshape(-1)]
    nb, g = qweight.shape[:2]
    if rows is None:
        return qweight.view(nb, g, 8, 8, 4).permute(0, 3, 1, 2, 4).reshape(nb * 8, g * GROUP)
    rows = rows.reshape(-1)
    p = qweight[rows // 8].view(-1, g, 8, 8, 4)[torch.arange(rows.numel()), :, :, rows % 8, :]  # [R, g, chunk, j]
    return p.reshape(rows.numel(), g * GROUP)


def dequantize_q8(w: Q8Weight) -> torch.Tensor:
    """Float32 ``[N, K]`` weight (for a dense prefill GEMM); kernel when available, else PyTorch."""
    if available():
        return torch.ops.pocketvlm.q8_dequantize(w.qweight, w.scales, w.biases)
    return dequantize_q8_reference(w)


def dequantize_q8_reference(w: Q8Weight) -> torch.Tensor:
    """Float32 ``[N, K]`` weight in plain PyTorch (the fallback, and the tests' reference)."""
    n, _ = q8_shape(w.qweight)
    out = unpack_q8(w.qweight).float().view(n, -1, GROUP) * rows_major(w.scales).float().unsqueeze(-1)
    if w.biases is not None:
        out = out + rows_major(w.biases).float().unsqueeze(-1)
    return out.view(n, -1)


def q8_linear(x: torch.Tensor, w: Q8Weight, scalar: bool = False) -> torch.Tensor:
    """``x [..., K] @ W.T`` -> float32 ``[..., N]`` with int8 activations (same per-32-block
    quantization and error bound as ``q4_linear(act="int8")``). Without the kernel: PyTorch matmul."""
    n, k = q8_shape(w.qweight)
    if x.shape[-1] != k or x.device.type != "cpu":
        _check_linear_args(x, k, "int8")
    if not (_state["ok"] or available()):
        return x.to(torch.float32) @ dequantize_q8(w).t()
    x2 = x.reshape(-1, k)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.to(torch.float32).contiguous()
    y = _ops.q8_linear(x2, w.qweight, w.scales, w.biases, 1 if scalar else 0)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)
