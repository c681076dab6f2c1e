"""Quantized drop-ins for ``nn.Linear`` that keep weights low-bit at run time.

Which code multiplies (:meth:`QuantLinear.forward`, chosen in :mod:`.paths`): on CPU, short inputs (decode, short
prompts) run pocketvlm's own C++ kernel (:mod:`.cpu_kernel`, int8 activations as in llama.cpp), long ones on
4-bit layers its int8 prefill GEMM where the CPU has AVX-512 VNNI; everything else - long prefills elsewhere,
other devices, a CPU where the kernel did not build - takes the dense path: the weight dequantized to
``dense_dtype`` and one ``F.linear`` GEMM.

Kinds, each with its own stored (``state_dict``) form and the kernel layout it runs in:

* :class:`Int4Linear` - MLC q4*_1 (``(q - 7) * s``) and GGUF Q4_0/Q4_1/Q4_K (``(q - 8) * s + z``): the 4-bit
  layout (``rows8``/``rows``), holding the same bytes as the stored nibbles.
* :class:`Int8Linear` - group-wise int8 (MLC q8f16_1, GGUF Q8_0): the 8-bit layout.
* :class:`Int5Linear` - GGUF Q5_0, stored as Int8Linear's codes, run in the 5-bit layout (0.69 B/weight).
* :class:`Int3Linear` - MLC q3f16_1, group 40: each group zero-padded into a 64-wide 4-bit group (exact, but
  it reads 64/40 of a 4-bit weight).

Inside, every kind maps its codes to one 4-bit form, ``w = (c - 8) * S + Z`` per kernel group ("kernel
codes", :meth:`QuantLinear._kernel_codes`; q8 as two 4-bit halves), which the generic dequantize and the
generic packing use. The layouts themselves are described once, in ``csrc/kernels.h``.

``dense_dtype`` on CPU is bfloat16 where the CPU multiplies bf16 natively (AVX-512-BF16 / AMX) and float32
elsewhere (PyTorch's bf16 GEMM is several times slower than fp32 on AVX2-only CPUs).

Storage: on CPU ``qweight`` is converted on first use into the kernel layout, replacing the stored one, so
weights are held once. ``state_dict()`` returns the stored, device-independent form, except inside
:func:`kernel_layout_state` (a package save): symmetric 4-bit layers then save the kernel layout
(:data:`KERNEL_LAYOUT`), and a package's loader marks them (:meth:`QuantLinear.expect_kernel_layout`) so
nothing is unpacked or repacked at load.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QuantizationError
from . import cpu_kernel, formats, paths
from .paths import cpu_dense_dtype

#: The stored kernel layout's name and version (a package's ``quantization.kernel_layout``): every symmetric
#: 4-bit ``qweight`` as the own kernel's packing, rows8 or rows (described in csrc/kernels.h).
KERNEL_LAYOUT = "q4-own-v1"
_SAVE_KERNEL_LAYOUT = contextvars.ContextVar("pocketvlm_save_kernel_layout", default=False)


@contextlib.contextmanager
def kernel_layout_state():
    """``state_dict()`` inside this block stores eligible 4-bit layers in :data:`KERNEL_LAYOUT`."""
    token = _SAVE_KERNEL_LAYOUT.set(True)
    try:
        yield
    finally:
        _SAVE_KERNEL_LAYOUT.reset(token)


class QuantLinear(nn.Module):
    """Base class: the ``nn.Linear`` call contract (``in_features``, ``out_features``, ``bias``) over
    low-bit codes. Subclasses say how their stored form maps to kernel codes."""

    kernel_group = 32
    mode: str = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int,
                 device=None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.k_padded = formats.padded_in_features(in_features, group_size)
        self.dense_dtype = cpu_dense_dtype()  # the prefill GEMM's dtype on CPU (see the module docstring)
        self._layout = "plain"  # or "own": qweight holds the own kernel's layout (see _prepare_own)
        self._own = None  # cpu_kernel.Q4Weight / Q8Weight for pocketvlm's own kernel
        self._own_direct = False  # True when _own can be called on the raw input (no padding, no row folding)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self._register_state_dict_hook(QuantLinear._plain_state_hook)

    # ----- per-kind mapping, implemented by subclasses --------------------------------------------
    def _kernel_codes(self, qweight: torch.Tensor) -> torch.Tensor:  # plain -> uint8 [N', K']
        raise NotImplementedError

    def _plain_from_kernel_codes(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _kernel_scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:  # float32 [N', G'] each
        raise NotImplementedError

    def _kernel_scale_zero_rows(self, krows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``_kernel_scale_zero()`` of some kernel rows only (an embedding lookup must not convert the
        scales of the whole table: 2.8 ms per token for Qwen2.5-0.5B's)."""
        s, z = self._kernel_scale_zero()
        return s[krows], z[krows]

    def _to_kernel_x(self, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, K']
        return F.pad(x, (0, self.k_padded - self.in_features)) if self.k_padded != self.in_features else x

    def _fold_rows(self, y: torch.Tensor) -> torch.Tensor:  # [..., N'] -> [..., N] (kernel rows -> out rows)
        return y

    def _fold_cols(self, w: torch.Tensor) -> torch.Tensor:  # [.., K'] -> [.., in]
        return w[..., : self.in_features]

    # ----- layout --------------------------------------------------------------------------------
    def _codes_now(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Kernel codes (all, or the given kernel rows) from whichever layout is held."""
        if self._layout == "own":
            codes = cpu_kernel.unpack_q4(self.qweight)
            return codes if rows is None else codes[rows]
        codes = self._kernel_codes(self.qweight)
        return codes if rows is None else codes[rows]

    def _to_plain(self) -> None:
        if self._layout == "own":
            self.qweight = self._plain_from_kernel_codes(self._codes_now())
            self._layout = "plain"
        self._own = None
        self._own_direct = False

    def set_scales(self, scales: torch.Tensor) -> None:
        """Replace the stored group scales (same codes); a kernel copy made from the old ones is dropped."""
        self._to_plain()
        with torch.no_grad():
            self.scales.copy_(scales.to(self.scales.dtype))

    def _own_ok(self, device: torch.device, m: int) -> bool:
        return device.type == "cpu" and cpu_kernel.available() and m < paths.own_kernel_max_tokens()

    def _prepare_own(self) -> None:
        """Weights for pocketvlm's own kernel: w = (c - 8) * S + Z per kernel group, as q * S + (Z - 8 S)."""
        if self._own is not None:
            return
        codes = self._codes_now()
        s, z = self._kernel_scale_zero()
        rep = self.kernel_group // 32
        if rep > 1:
            s, z = s.repeat_interleave(rep, 1), z.repeat_interleave(rep, 1)
        self._own = cpu_kernel.pack_q4(codes, s, biases=z - 8 * s, dtype=torch.float32)

    def _own_forward(self, x2: torch.Tensor) -> torch.Tensor:
        self._prepare_own()
        xk = self._to_kernel_x(x2.float()).contiguous()
        if isinstance(self._own, cpu_kernel.Q8Weight):
            return cpu_kernel.q8_linear(xk, self._own)
        return self._fold_rows(cpu_kernel.q4_linear(xk, self._own, act=paths.OWN_KERNEL_ACT))

    def _gemm_ok(self, m: int) -> bool:
        """Whether ``m`` input rows run the int8 prefill GEMM (:data:`.paths.PREFILL_INT8_ROWS`): rows8 weights (4-, 5-
        or 8-bit) read as they are (no padding, no row folding)."""
        lo, hi = paths.PREFILL_INT8_ROWS or paths.prefill_int8_rows()
        if not lo <= m < hi:
            return False
        self._prepare_own()
        return self._own_direct and cpu_kernel.gemm_layout(self._own)

    def stored_kernel_shape(self) -> tuple | None:
        """The ``qweight`` shape of :data:`KERNEL_LAYOUT` when this layer can be stored in it, else None."""
        return None

    def kernel_extra_bytes(self) -> int:
        """Bytes the own kernel's form adds to the stored tensors once this layer has run on CPU (the generic
        4-bit packing: codes in kernel groups, float32 scales and biases); the memory estimate's kernel term."""
        groups = self.kernel_rows * (self.kernel_cols // 32)
        return self.kernel_rows * self.kernel_cols // 2 + 2 * 4 * groups

    def _scale_copy_bytes(self) -> int:  # the kernel's own copy of the scales (rows8 order or dtype)
        return self.scales.numel() * (2 if self.scales.dtype == torch.float16 else 4)

    def expect_kernel_layout(self) -> None:
        """The next state dict loaded holds this layer's ``qweight`` in :data:`KERNEL_LAYOUT` (a package says so)."""
        self._expect_kernel = self.stored_kernel_shape() is not None

    @staticmethod
    def _plain_state_hook(module, state_dict, prefix, local_metadata):
        if _SAVE_KERNEL_LAYOUT.get() and module.stored_kernel_shape() is not None:
            state_dict[prefix + "qweight"] = module._stored_kernel_qweight()
        elif module._layout == "own":
            state_dict[prefix + "qweight"] = module._plain_from_kernel_codes(module._codes_now())
        return state_dict

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        incoming = state_dict.get(prefix + "qweight")
        own = getattr(self, "_expect_kernel", False) and incoming is not None
        self._expect_kernel = False
        if self._layout == "own" or own:  # drop the layout held; make room for the one loaded
            shape = self.stored_kernel_shape() if own else self.plain_shape
            self.qweight = torch.empty(shape, dtype=self.plain_dtype, device=self.qweight.device)
            self._layout = "own" if own else "plain"
        self._own = None
        self._own_direct = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._to_plain()  # the kernel layout means nothing elsewhere; repacked lazily on use
        # model.to(bfloat16) must move scales but not round them: keep their dtype (only bias follows)
        keep = {n: getattr(self, n) for n in ("scales", "zeros") if getattr(self, n, None) is not None}
        out = super()._apply(fn, recurse)
        for n, old in keep.items():
            new = getattr(self, n)
            if new.dtype != old.dtype:
                setattr(self, n, old.to(new.device))
        return out

    # ----- compute ---------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight ``[out, in]`` (or only ``rows``), computed in float32 from codes and the
        stored (not bf16-rounded) scales."""
        krows = None if rows is None else self._kernel_rows_for(rows)
        if rows is not None and self._layout in ("plain", "own"):
            # unpack only the requested rows (an embedding lookup must not touch the whole table);
            # for Int8 the kernel rows (rows, rows + N) come out of _kernel_codes in that same order
            if self._layout == "own":
                codes = cpu_kernel.unpack_q4_rows(self.qweight, rows)
            else:
                codes = self._kernel_codes(self.qweight[rows.reshape(-1)])
        else:
            codes = self._codes_now(krows)
        s, z = self._kernel_scale_zero() if krows is None else self._kernel_scale_zero_rows(krows)
        g = self.kernel_group
        w = self._group_dequant(codes.view(codes.shape[0], -1, g).float(), s.unsqueeze(-1), z.unsqueeze(-1))
        w = w.view(codes.shape[0], -1)
        if rows is None:
            w = self._fold_rows(w.t()).t()
        else:
            w = w.view(len(self._kernel_row_parts), rows.numel(), -1).sum(0)
        return self._fold_cols(w).to(dtype)

    def dense_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight for the dense (prefill / non-CPU) path, computed directly in ``dtype`` from
        ``dtype``-rounded scales (~5x cheaper than in float32)."""
        codes = self._codes_now()
        s, z = (t.to(dtype).unsqueeze(-1) for t in self._kernel_scale_zero())
        w = self._group_dequant(codes.view(codes.shape[0], -1, self.kernel_group).to(dtype), s, z)
        w = w.view(codes.shape[0], -1)
        return self._fold_cols(self._fold_rows(w.t()).t())

    _kernel_row_parts = (0,)

    def _group_dequant(self, c, s, z):
        return (c - 8) * s + z

    def _kernel_rows_for(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.reshape(-1)
        return torch.cat([rows + p * self.out_features for p in self._kernel_row_parts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        own = self._own
        if own is not None and self._own_direct and x.dtype == torch.float32 and x.shape[-1] == self.in_features:
            # decode fast path: straight to the op (the general path below costs ~90 us of Python per call)
            x2 = x.reshape(-1, self.in_features)
            m = x2.shape[0]  # (rows the general path gives the int8 prefill GEMM go there: same path every call)
            gemm_from = (paths.PREFILL_INT8_ROWS or paths.prefill_int8_rows())[0]
            if m < (paths.OWN_KERNEL_MAX_TOKENS or paths.own_kernel_max_tokens()) and x2.is_contiguous() \
                    and x.device.type == "cpu" and (m < gemm_from or not self._gemm_ok(m)):
                if isinstance(own, cpu_kernel.Q8Weight):
                    y = cpu_kernel._ops.q8_linear(x2, own.qweight, own.scales, own.biases, 0)
                else:
                    y = cpu_kernel._ops.q4_linear(x2, own.packed, own.scales, own.biases, own.offset,
                                                  paths.OWN_KERNEL_ACT == "int8", 0)
                if self.bias is not None:
                    y += self.bias
                return y.view(*x.shape[:-1], self.out_features)
        if x.shape[-1] != self.in_features:
            raise QuantizationError(
                f"{type(self).__name__} expects inputs with last dim {self.in_features}, got {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and self._gemm_ok(x2.shape[0]):
            y = cpu_kernel.q4_gemm(x2, self._own)
        elif self._own_ok(x.device, x2.shape[0]):
            y = self._own_forward(x2)
        else:
            cd = self.dense_dtype if x.device.type == "cpu" else x.dtype
            y = F.linear(x2.to(cd), self.dense_weight(cd))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode}")


class Int4Linear(QuantLinear):
    """4-bit codes, group 32. ``zeros is None``: MLC symmetric ``(q - 7) * s``; otherwise affine
    ``(q - 8) * scales + zeros`` (GGUF Q4_0/Q4_1/Q4_K)."""

    def __init__(self, in_features, out_features, bias=True, *, mode="q4f16_1", affine=False,
                 group_size=32, scale_dtype=torch.float16, device=None, dtype=torch.float32):
        super().__init__(in_features, out_features, bias, group_size, device, dtype)
        if group_size != 32:
            raise QuantizationError(f"Int4Linear supports group size 32, got {group_size}")
        self.mode = mode
        self.kernel_rows, self.kernel_cols = out_features, self.k_padded
        self.plain_shape, self.plain_dtype = (out_features, self.k_padded // 2), torch.uint8
        g = self.k_padded // group_size
        self.register_buffer("qweight", torch.zeros(self.plain_shape, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, g, dtype=scale_dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, g, dtype=scale_dtype, device=device) if affine else None)

    def _kernel_codes(self, qweight):
        return formats.unpack_4bit(qweight)

    def _plain_from_kernel_codes(self, codes):
        return formats.pack_4bit(codes)

    def _kernel_scale_zero(self):
        s = self.scales.float()
        return s, (s if self.zeros is None else self.zeros.float())

    def _kernel_scale_zero_rows(self, krows):
        s = self.scales[krows].float()
        return s, (s if self.zeros is None else self.zeros[krows].float())

    def stored_kernel_shape(self) -> tuple | None:
        n, k = self.out_features, self.k_padded
        if self.zeros is not None or self.qweight.device.type not in ("cpu", "meta"):
            return None
        return (n // 8, k // 32, 128) if n % 8 == 0 and n > 0 else (n, k // 2)  # pack_q4's "auto" choice

    def kernel_extra_bytes(self) -> int:  # the codes are repacked in place; symmetric: a copy of the scales
        return self._scale_copy_bytes() if self.zeros is None else 2 * 4 * self.scales.numel()

    def _stored_kernel_qweight(self) -> torch.Tensor:
        self._prepare_own()  # the layout the first forward would make: held once, shared by tied keys
        return self.qweight

    def _prepare_own(self):
        if self._own is not None:
            return
        if self._layout == "own" and self.zeros is None:
            # stored in the kernel layout (a package): only the scales change form for rows8, [N/8, G, 8]
            n, g = self.scales.shape
            dt = torch.float16 if self.scales.dtype == torch.float16 else torch.float32
            s = self.scales.to(device="cpu", dtype=dt)
            s = s.view(n // 8, 8, g).transpose(1, 2) if self.qweight.dim() == 3 else s
            self._own = cpu_kernel.Q4Weight(self.qweight, s.contiguous(), None, 7.0)
            self._own_direct = self.k_padded == self.in_features
            return
        codes = self._codes_now()
        if self.zeros is None:  # MLC symmetric: (q - 7) * s, 4.5 bits per weight with fp16 scales
            self._own = cpu_kernel.pack_q4(codes, self.scales.float(), offset=7.0,
                                           dtype=torch.float16 if self.scales.dtype == torch.float16 else torch.float32)
        else:
            s, z = self._kernel_scale_zero()
            self._own = cpu_kernel.pack_q4(codes, s, biases=z - 8 * s, dtype=torch.float32)
        self.qweight = self._own.packed  # same bytes as the plain layout, in the kernel's nibble order
        self._layout = "own"
        self._own_direct = self.k_padded == self.in_features

    def dense_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        if dtype in (torch.float32, torch.bfloat16) and self._layout == "own" and cpu_kernel.available():
            # one C++ pass over the packed bytes (3-5x faster than unpacking in PyTorch: prefill's cost);
            # kernel rows are the output rows here
            self._prepare_own()  # (a loaded package's kernel layout: wrapped on first use)
            return self._fold_cols(cpu_kernel.dequantize_q4(self._own)).to(dtype)
        return super().dense_weight(dtype)

    def _group_dequant(self, c, s, z):
        # MLC's own formula, (q - 7) * s: identical to the kernel's (q - 8) * s + s in exact
        # arithmetic, and bit-exact in float32 even for q4f32_1's fp32 scales
        return (c - 7) * s if self.zeros is None else (c - 8) * s + z


class Int8Linear(QuantLinear):
    """Signed int8 codes ``c`` with ``w = c * scale`` per group of 32 (for MLC q8f16_1, ``c = q - 127``)."""

    _kernel_row_parts = (0, 1)

    def __init__(self, in_features, out_features, bias=True, *, mode="q8f16_1", group_size=32,
                 scale_dtype=torch.float16, device=None, dtype=torch.float32):
        super().__init__(in_features, out_features, bias, group_size, device, dtype)
        if group_size != 32:
            raise QuantizationError(f"Int8Linear supports group size 32, got {group_size}")
        self.mode = mode
        self.kernel_rows, self.kernel_cols = 2 * out_features, self.k_padded
        self.plain_shape, self.plain_dtype = (out_features, self.k_padded), torch.int8
        self.register_buffer("qweight", torch.zeros(self.plain_shape, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, self.k_padded // group_size,
                                                   dtype=scale_dtype, device=device))

    def _kernel_codes(self, qweight):
        u = qweight.to(torch.int16) + 128  # 0..255
        return torch.cat([u >> 4, u & 15]).to(torch.uint8)  # [2N, K]: high halves, then low halves

    def _plain_from_kernel_codes(self, codes):
        n = self.out_features
        return (codes[:n].to(torch.int16) * 16 + codes[n:] - 128).to(torch.int8)

    def _kernel_scale_zero(self):
        s = self.scales.float()
        return torch.cat([16 * s, s]), torch.cat([8 * s, torch.zeros_like(s)])

    def _kernel_scale_zero_rows(self, krows):
        high = (krows < self.out_features)[:, None]  # kernel rows [0, N): high halves, [N, 2N): low halves
        s = self.scales[krows % self.out_features].float()
        return torch.where(high, 16 * s, s), torch.where(high, 8 * s, torch.zeros_like(s))

    def _fold_rows(self, y):
        n = self.out_features
        return y[..., :n] + y[..., n:]

    def dense_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        if dtype in (torch.float32, torch.bfloat16) and self._layout in ("plain", "own") \
                and self.qweight.device.type == "cpu" and cpu_kernel.available():
            # one C++ pass over the int8 codes (the kernel-code path below took ~65 ms per 4864 x 896 matrix)
            self._prepare_own()
            return self._fold_cols(cpu_kernel.dequantize_q8(self._own)).to(dtype)
        return super().dense_weight(dtype)

    def kernel_extra_bytes(self) -> int:  # the codes are reordered in place; a copy of the scales
        return self._scale_copy_bytes()

    def _prepare_own(self):
        if self._own is None:
            self._own = cpu_kernel.pack_q8(self.qweight, self.scales.float(),
                                           dtype=torch.float16 if self.scales.dtype == torch.float16 else torch.float32)
            self.qweight = self._own.qweight  # hold the codes once (rows8: in the kernel's order)
            self._layout = "own" if self.qweight.dim() == 3 else "plain"
            self._own_direct = self.k_padded == self.in_features

    def _own_codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The signed codes ``c`` (``w = c * scale``; all, or some rows) from the own layout ``qweight`` holds."""
        return cpu_kernel.unpack_q8(self.qweight, rows)

    def _codes_now(self, rows=None):
        if self._layout != "own":
            return super()._codes_now(rows)
        codes = self._kernel_codes(self._own_codes().to(torch.int8))
        return codes if rows is None else codes[rows]

    def dequantize(self, dtype=torch.float32, rows=None):
        if self._layout != "own":
            return super().dequantize(dtype, rows)
        r = None if rows is None else rows.reshape(-1)
        codes = self._own_codes(r).float()
        s = self.scales.float() if r is None else self.scales[r].float()
        w = (codes.view(codes.shape[0], -1, 32) * s.unsqueeze(-1)).view(codes.shape[0], -1)
        return self._fold_cols(w).to(dtype)


class Int5Linear(Int8Linear):
    """5-bit codes (GGUF Q5_0: ``w = (q - 16) * d``, q in 0..31, fp16 ``d`` per 32 weights), exact.

    Stored and saved as :class:`Int8Linear`'s signed codes ``c = q - 16`` (so every generic path - the
    state dict, PyTorch fallbacks, other devices - is Int8Linear's), but on the CPU with the own kernel
    it repacks once into the kernel's 5-bit rows8 layout (``cpu_kernel.pack_q5``: 0.69 instead of
    1.06 bytes per weight, and decode reads that much less) and drops the int8 codes."""

    def _prepare_own(self):
        if self._own is not None:
            return
        if self.out_features % 8 or self.k_padded != self.in_features:
            super()._prepare_own()  # the 8-bit kernel (any N, padded K)
            return
        try:  # the int8 codes c = q - 16, packed a slice at a time (no wide copy of a 136M-weight table)
            self._own = cpu_kernel.pack_q5(self.qweight, self.scales, offset=16.0, code_offset=16,
                                           dtype=torch.float16 if self.scales.dtype == torch.float16 else torch.float32)
        except QuantizationError as e:
            raise QuantizationError(f"{self.mode} layer holds codes outside -16..15") from e
        self.qweight = self._own.packed
        self._layout = "own"
        self._own_direct = True

    def kernel_extra_bytes(self) -> int:  # 5-bit layout (160 B per 8 x 32) replaces the int8 codes
        if self.out_features % 8 or self.k_padded != self.in_features:
            return super().kernel_extra_bytes()
        return self._scale_copy_bytes() - self.qweight.numel() * 3 // 8

    def _own_q5(self) -> bool:
        """qweight holds the 5-bit layout (else the int8 codes, or the q8 fallback's rows8)."""
        return self._layout == "own" and self.qweight.dtype == torch.uint8

    def _own_codes(self, rows=None):
        if not self._own_q5():
            return super()._own_codes(rows)
        q = cpu_kernel.unpack_q4(self.qweight) if rows is None else cpu_kernel.unpack_q4_rows(self.qweight, rows)
        return q.to(torch.int16) - 16

    def dense_weight(self, dtype=torch.bfloat16):
        if dtype in (torch.float32, torch.bfloat16) and self.qweight.device.type == "cpu" and cpu_kernel.available():
            self._prepare_own()  # one C++ pass over the 5-bit layout
            if isinstance(self._own, cpu_kernel.Q4Weight):
                return self._fold_cols(cpu_kernel.dequantize_q4(self._own)).to(dtype)
        if self._own_q5():
            return self.dequantize(dtype)
        return super().dense_weight(dtype)

    def _own_forward(self, x2):
        self._prepare_own()
        if isinstance(self._own, cpu_kernel.Q8Weight):
            return super()._own_forward(x2)
        return cpu_kernel.q4_linear(self._to_kernel_x(x2.float()).contiguous(), self._own, act=paths.OWN_KERNEL_ACT)


class Int3Linear(QuantLinear):
    """MLC q3f16_1: 3-bit codes, group 40, ``w = (q - 3) * scale``; stored ten codes per int32."""

    kernel_group = 64

    def __init__(self, in_features, out_features, bias=True, *, mode="q3f16_1", group_size=40,
                 scale_dtype=torch.float16, device=None, dtype=torch.float32):
        super().__init__(in_features, out_features, bias, group_size, device, dtype)
        if group_size != 40:
            raise QuantizationError(f"Int3Linear supports group size 40, got {group_size}")
        self.mode = mode
        self.n_groups = self.k_padded // 40
        self.kernel_rows, self.kernel_cols = out_features, self.n_groups * 64
        self.plain_shape, self.plain_dtype = (out_features, self.k_padded // 10), torch.int32
        self.register_buffer("qweight", torch.zeros(self.plain_shape, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(out_features, self.n_groups, dtype=scale_dtype, device=device))

    def _kernel_codes(self, qweight):
        codes = formats.unpack_3bit(qweight).view(qweight.shape[0], self.n_groups, 40) + 5
        return F.pad(codes, (0, 24), value=8).view(qweight.shape[0], -1)  # kernel code 8 = weight 0

    def _plain_from_kernel_codes(self, codes):
        q = codes.view(codes.shape[0], self.n_groups, 64)[..., :40] - 5
        return formats.pack_3bit(q.reshape(codes.shape[0], -1))

    def _kernel_scale_zero(self):
        s = self.scales.float()
        return s, torch.zeros_like(s)

    def _to_kernel_x(self, x):
        x = F.pad(x, (0, self.k_padded - self.in_features)).view(x.shape[0], self.n_groups, 40)
        return F.pad(x, (0, 24)).view(x.shape[0], -1)

    def _fold_cols(self, w):
        return w.view(*w.shape[:-1], self.n_groups, 64)[..., :40].reshape(*w.shape[:-1], -1)[..., : self.in_features]


_KINDS = {4: Int4Linear, 8: Int8Linear, 3: Int3Linear}


def quant_linear_from_float(linear: nn.Linear, mode: str | formats.QuantMode, *, search: bool = False,
                            importance: torch.Tensor | None = None) -> QuantLinear:
    """Quantize an ``nn.Linear``'s weight with an MLC mode into the matching :class:`QuantLinear`
    (``search``/``importance``: the scale choice of :func:`pocketvlm.quant.formats.quantize`)."""
    mode = formats.parse_mode(mode)
    if not mode.quantized:
        raise QuantizationError(f"mode {mode.name} does not quantize; cast the layer to {mode.dtype} instead")
    w = linear.weight.detach()
    codes, scales = formats.quantize(w, mode, search=search, importance=importance)
    return quant_linear_from_codes(linear, mode, codes, scales)


def quant_linear_from_codes(linear: nn.Linear, mode: str | formats.QuantMode, codes: torch.Tensor,
                            scales: torch.Tensor) -> QuantLinear:
    """The :class:`QuantLinear` for ``linear`` (its shape and bias) holding the given unpacked ``codes``
    ``[out, in_padded]`` and ``scales`` of an MLC mode, as :func:`pocketvlm.quant.formats.quantize` returns them."""
    mode = formats.parse_mode(mode)
    w = linear.weight
    cls = _KINDS[mode.bits]
    m = cls(linear.in_features, linear.out_features, linear.bias is not None, mode=mode.name,
            group_size=mode.group_size, scale_dtype=mode.torch_scale_dtype, device=w.device, dtype=w.dtype)
    if mode.bits == 8:
        m.qweight.copy_((codes.to(torch.int16) - mode.offset).to(torch.int8))
    else:
        m.qweight.copy_(formats.pack(codes, mode.bits))
    m.scales.copy_(scales)
    if linear.bias is not None:
        m.bias.data.copy_(linear.bias.detach())
    return m
