"""pocketvlm.quant: weight quantization and the low-bit kernels that run it.

Public API
----------
Modes (``formats``), MLC LLM's names and math (symmetric group quantization, no zero point)::

    MODES, QuantMode, parse_mode(name)          # q0f32 q0f16 q0bf16 q4f16_1 q4f32_1 q3f16_1 q8f16_1
    quantize(w, mode, *, search=False, importance=None) -> (codes uint8 [out, in_pad], scales [out, groups])
    dequantize(codes, scales, mode, in_features=None, dtype=float32)
    pack_4bit / unpack_4bit, pack_3bit / unpack_3bit (10 codes per int32), pack / unpack

Choosing scales and rounding (same format, better weights)::

    scales.search_scales(groups, offset, max_code, scale_dtype, h)   # per-group error-minimising scale
    gptq.gptq_quantize(w, H, mode) -> (codes, scales)                 # GPTQ with the input Hessian H
    calibrate.calibrate_model(model, mode, windows) -> {name: mode}  # quantize_model with GPTQ rounding
    calibrate.calibration_windows(token_ids, context=512, windows=64), calibrate.default_text()

GGUF blocks (``gguf_blocks``), from ``GGUFReader`` tensors (``.data``, ``.tensor_type``, ``.shape``)::

    torch_shape(gguf_shape)                     # GGUF dims are innermost-first: reversed
    dequantize_gguf(data, ggml_type, torch_shape, dtype=float32)
        # F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K, bit-equal to gguf.quants

Modules (``linear``), drop-ins with the ``nn.Linear`` / ``nn.Embedding`` call contract::

    QuantLinear (Int4Linear, Int8Linear, Int5Linear, Int3Linear): .dequantize(dtype, rows=None)
    quant_linear_from_float(linear, mode)
    QuantEmbedding(table).as_lm_head() -> TiedQuantHead (one quantized tensor, two uses)

Which CPU code multiplies (``paths``)::

    own_kernel_max_tokens(), dense_from_tokens()  # from this many rows (CPU), dequantize + dense GEMM
    prefill_int8_rows()                         # rows [lo, hi) that 4-bit layers run on the int8 prefill GEMM

Whole models (``apply``)::

    quantize_model(model, mode, *, skip=None, overrides=None, embeddings=False, search=False) -> {name: mode}
    module_mode(name, module, mode, ...)        # quantize_model's policy for one module: a mode or None
    quantize_module(module, mode) -> module     # one Linear/Embedding quantized (q0*: cast in place)
    tied_head(linear, embedding)                # a tied LM head over a quantized embedding, or None
    build_quantized(model, record)              # empty quantized skeleton for load_state_dict
    gguf_linear(data, ggml_type, gguf_shape, *, bias=None, dtype=float32, name="") -> (module, mode)
    gguf_embedding(data, ggml_type, gguf_shape, *, dtype=float32, name="") -> (module, mode)

``state_dict()`` of quantized modules holds plain tensors (packed ints + scales [+ zeros]) that
safetensors can save; ``build_quantized(model, record)`` then ``load_state_dict`` restores them.
Which code multiplies (own kernel or dense GEMM) is told in :mod:`pocketvlm.quant.linear`; the weight
layouts the kernels read in ``csrc/kernels.h``; measurements in ``benchmarks/quant_kernels.py`` and
``benchmarks/cpu_kernel.py``.
"""
from .apply import (
    DEFAULT_SKIP, GGUF_INT4, GGUF_INT5, build_quantized, gguf_embedding, gguf_linear, module_mode, quantize_model,
    quantize_module, tied_head,
)
from .formats import (
    MODES, QuantMode, dequantize, pack, pack_3bit, pack_4bit, parse_mode, quantize, unpack, unpack_3bit, unpack_4bit,
)
from .gguf_blocks import dequantize_gguf, torch_shape
from .embedding import QuantEmbedding, TiedQuantHead
from .linear import Int3Linear, Int4Linear, Int5Linear, Int8Linear, QuantLinear, quant_linear_from_float
from .paths import dense_from_tokens, own_kernel_max_tokens, prefill_int8_rows

__all__ = [
    "MODES", "QuantMode", "parse_mode", "quantize", "dequantize", "pack", "unpack", "pack_4bit", "unpack_4bit",
    "pack_3bit", "unpack_3bit", "dequantize_gguf", "torch_shape", "QuantLinear", "Int4Linear", "Int5Linear", "Int8Linear",
    "Int3Linear", "QuantEmbedding", "TiedQuantHead", "quant_linear_from_float", "own_kernel_max_tokens", "dense_from_tokens",
    "prefill_int8_rows",
    "quantize_model", "module_mode", "quantize_module", "tied_head", "build_quantized", "gguf_linear", "gguf_embedding",
    "DEFAULT_SKIP", "GGUF_INT4", "GGUF_INT5",
]
