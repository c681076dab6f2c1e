"""The fused CPU decode step: one C++ call per generated token (``csrc/decode_step.cpp``).

Eager decode of a quantized 0.5B model spends about as long dispatching its ~400 small PyTorch operators
per token as reading the weights. :class:`FusedDecode` hands a ``DecodePlan`` references to the model's
quantized weights and norms once (the weights first moved, in decode order, into one arena of huge pages where
the OS allows it: :mod:`pocketvlm.quant.hugepages`; the modules keep using the same tensors), then runs a whole
token in one call: the embedding row of a
quantized table, the same q4/q8 kernels with int8 activations as the per-layer path, RMSNorm, RoPE, KV-cache
writes, (sliding-window, soft-capped) attention, the gated MLP, the final norm and a quantized LM head, on
torch's own threads with spin barriers between the phases. The RoPE tables (so every RoPE scaling type is the
model's own code), the final soft-capping, and an unquantized embedding or head stay in PyTorch.

Used for the llama-like families (llama, qwen2, gemma, gemma2, gemma3 text, phi3 and the VLMs built on
them) when the model is on the CPU, float32, and every projection of its layers is a q4 or q8 layer
running on pocketvlm's own kernel. :func:`plan_or_reason` says why a model does not qualify; it then
decodes eagerly, exactly as before.
"""
from __future__ import annotations

import torch

from ..models import gemma, layers as L, llama
from ..quant import cpu_kernel
from ..quant.hugepages import move_to_hugepages
from ..quant.linear import Int4Linear, Int5Linear, Int8Linear

_ACT = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu": 2}


def text_decoder(model):
    """The llama-like causal LM inside ``model`` (itself, or a VLM's language model)."""
    sync = getattr(model, "_sync_text", None)
    if sync is not None:
        sync()
    return getattr(model, "_text", model)


def _norm(module, what: str, plus_one: bool | None):
    """(weight, plus_one) of an RMSNorm the kernel can run, else raise ValueError."""
    if type(module) is gemma.RMSNorm:
        kind = True
    elif type(module) is L.RMSNorm:
        kind = False
    else:
        raise ValueError(f"{what} is a {type(module).__name__}, not an RMSNorm the fused step runs")
    if plus_one is not None and kind != plus_one:
        raise ValueError("the model mixes Llama and Gemma RMSNorms")
    w = module.weight.detach()
    if w.dtype != torch.float32 or w.device.type != "cpu":
        raise ValueError(f"{what} is {w.dtype} on {w.device}; the fused step runs float32 on the CPU")
    return w.contiguous(), kind


def _linear_args(layer) -> tuple:
    """(weight, scales, biases, offset, bias) of a q4/q5/q8 layer on the own kernel, else raise ValueError."""
    if type(layer) not in (Int4Linear, Int5Linear, Int8Linear):
        raise ValueError(f"a projection is a {type(layer).__name__}, not a q4/q8 layer on pocketvlm's kernel")
    layer._prepare_own()
    if not layer._own_direct:
        raise ValueError(f"{layer.mode} layer with padded input size {layer.in_features}")
    own = layer._own
    bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
    if isinstance(own, cpu_kernel.Q8Weight):
        return own.qweight, own.scales, own.biases, 0.0, bias
    return own.packed, own.scales, own.biases, float(own.offset), bias


def build_plan(text) -> tuple:
    """(DecodePlan, layer types in rope-table order) for a llama-like ``text`` model; ValueError if not."""
    if not isinstance(text, llama.Model):
        raise ValueError(f"{type(text).__name__} is not a llama-like decoder")
    cfg = text.config
    layers = list(text.model.layers)
    if not layers:
        raise ValueError("the model has no layers")
    a0, m0 = layers[0].self_attn, layers[0].mlp
    act = _ACT.get(getattr(m0, "act_name", None))
    if act is None:
        raise ValueError(f"activation {getattr(m0, 'act_name', None)!r} is not supported by the fused step")
    _, plus_one = _norm(layers[0].input_layernorm, "input_layernorm", None)
    # every weight decode streams, in decode order, into one arena of huge pages where the OS allows it
    # (before the plan takes its references; unsupported layers raise here, before anything moved)
    slots = ("qkv", "o", "gate_up", "down")
    linears = [[(slot, _linear_args(lin)) for slot, key in enumerate(slots) for lin in layer.parts()[key]]
               for layer in layers]  # per layer: (plan slot, kernel args) in decode order
    # the LM head (a TiedQuantHead runs the embedding's table), else it runs in PyTorch after the step
    head = _own_args(getattr(getattr(text.lm_head, "_embedding", None), "table", None) or text.lm_head)
    streamed = [args[:3] for per_layer in linears for _, args in per_layer] + ([head[:3]] if head else [])
    move_to_hugepages([t for args in streamed for t in args])
    plan = torch.classes.pocketvlm.DecodePlan(
        cfg.hidden_size, a0.n_heads, a0.n_kv, a0.head_dim, cfg.intermediate_size, float(cfg.rms_norm_eps),
        plus_one, act, float(a0.scale), float(a0.softcap or 0.0))
    types: list[str] = []
    for i, layer in enumerate(layers):
        a, m = layer.self_attn, layer.mlp
        if (a.scale, a.softcap, a.n_heads, a.n_kv, a.head_dim) != (a0.scale, a0.softcap, a0.n_heads, a0.n_kv,
                                                                    a0.head_dim) or _ACT.get(m.act_name) != act:
            raise ValueError(f"layer {i} differs from layer 0 in its attention or activation settings")
        parts = layer.parts()
        norms = {}
        for key in ("in_norm", "attn_out_norm", "ffn_in_norm", "ffn_out_norm", "q_norm", "k_norm"):
            norms[key] = None if parts[key] is None else _norm(parts[key], f"layer {i} {key}", plus_one)[0]
        if layer.layer_type not in types:
            types.append(layer.layer_type)
        window = cfg.sliding_window if layer.layer_type == "sliding_attention" else None
        plan.add_layer(norms["in_norm"], norms["attn_out_norm"], norms["ffn_in_norm"], norms["ffn_out_norm"],
                       norms["q_norm"], norms["k_norm"], int(window or 0), types.index(layer.layer_type))
        for slot, args in linears[i]:
            plan.add_linear(slot, *args)
    # a quantized embedding table (QuantEmbedding) is looked up in the plan, else in PyTorch
    emb = _own_args(getattr(text.model.embed_tokens, "table", None))
    if emb is not None and type(text.model).scale_embeddings is llama.TextModel.scale_embeddings:
        plan.set_embedding(*emb[:4], float(text.model.embed_scale()))
    if head is not None:
        plan.set_final_norm(_norm(text.model.norm, "final norm", plus_one)[0])
        plan.add_linear(4, *head)
    plan.finalize()
    return plan, types


def _own_args(layer):
    """``_linear_args(layer)`` when the layer can run on the own kernel, else None."""
    try:
        return _linear_args(layer)
    except ValueError:
        return None


def plan_or_reason(model) -> tuple:
    """(FusedDecode, None) when ``model`` can use the fused step, else (None, why not)."""
    try:
        p = next(model.parameters())
    except StopIteration:
        return None, "the model has no parameters"
    if p.device.type != "cpu":
        return None, f"the model is on {p.device} (the fused step is a CPU kernel)"
    if not cpu_kernel.available():
        return None, "pocketvlm's CPU kernel did not build"
    try:
        return FusedDecode(model), None
    except (ValueError, RuntimeError) as e:
        return None, str(e)


class FusedDecode:
    """A :class:`~pocketvlm.engine.generate.Slot` ``decode_step``: token id -> fp32 logits ``[V]``."""

    ROPE_BLOCK = 256  # positions whose cos/sin are computed at once (by the model's own RoPE code)

    def __init__(self, model):
        self.model = model
        self.text = text_decoder(model)
        self.plan, self.types = build_plan(self.text)
        self._rope_start = None
        self._tables: list = []

    def _rope(self, pos: int):
        start = pos - pos % self.ROPE_BLOCK
        if start != self._rope_start:
            p = torch.arange(start, start + self.ROPE_BLOCK)
            self._tables = []
            for t in self.types:
                c, s = self.text.model.rope(p, torch.float32, t)
                self._tables.append((c.reshape(self.ROPE_BLOCK, -1).contiguous(),
                                     s.reshape(self.ROPE_BLOCK, -1).contiguous()))
            self._rope_start = start
        i = pos - start
        return [c[i] for c, _ in self._tables], [s[i] for _, s in self._tables]

    def __call__(self, slot, token: int, pos: int) -> torch.Tensor:
        return self.rows([slot], [token], [pos])[0]

    def rows(self, slots, tokens, positions) -> torch.Tensor:
        """Several tokens in one step that reads every weight once: token ``tokens[i]`` at position
        ``positions[i]`` of ``slots[i]``'s cache -> fp32 logits ``[len(tokens), V]``. Tokens of one slot at
        consecutive positions are one sequence (draft tokens to verify: each attends to those before it); tokens of
        different slots are independent sequences (a batch). Each row equals a single-token step of that row
        alone, bit for bit."""
        text = self.text.model
        uniq: list = []
        for s in slots:
            if not any(s is u for u in uniq):
                uniq.append(s)
        cache_of = [next(i for i, u in enumerate(uniq) if u is s) for s in slots]
        k = [t for u in uniq for t in u.cache.k]
        v = [t for u in uniq for t in u.cache.v]
        tables = [self._rope(p) for p in positions]
        cos = [torch.stack([c[i] for c, _ in tables]) for i in range(len(self.types))]
        sin = [torch.stack([s[i] for _, s in tables]) for i in range(len(self.types))]
        pos = [int(p) for p in positions]
        if self.plan.has_embedding():
            out = self.plan.step_tokens([int(t) for t in tokens], pos, cache_of, cos, sin, k, v)
        else:
            ids = torch.tensor([list(tokens)], device=slots[0].device)
            x = text.scale_embeddings(self.text.get_input_embeddings()(ids)).float().reshape(len(pos), -1)
            out = self.plan.step_rows(x, pos, cache_of, cos, sin, k, v)
        if self.plan.has_head():
            return self.text.finish_logits(out)
        return self.text.final_logits(text.norm(out.unsqueeze(0)))[0]
