"""Vision-language projectors: map vision-tower features ``[B, N, vision_hidden]`` into the text
model's embedding space ``[B, M, text_hidden]``.

Each module keeps the parameter names of the checkpoints that use it, so loading is "strip the
checkpoint's prefix, then a strict ``load_state_dict``":

- ``linear``      — LLaVA-1's plain ``nn.Linear`` (``model.mm_projector.{weight,bias}``).
- ``mlpNx_gelu``  — Linear, then N-1 x (GELU, Linear). ``mlp2x_gelu`` is LLaVA-1.5 / LLaVA-OneVision,
                    laid out like Hugging Face's ``LlavaMultiModalProjector``
                    (``multi_modal_projector.linear_1`` / ``linear_2``).
- ``ldp``         — MobileVLM v1 "Lightweight Downsample Projector" (``model.mm_projector.model.*``).
- ``ldpv2``       — MobileVLM_V2's projector (``model.mm_projector.{mlp,peg}.*``).

MobileVLM's configs spell the last two ``ldpnet`` / ``ldpnetv2``; both spellings are accepted.
The MobileVLM modules are written from the structure of Meituan-AutoML/MobileVLM's
``mobilevlm/model/vision_projector.py`` (which builds them from torchvision's MobileNetV3 blocks and
timm's ``LayerNormAct2d``); their state-dict keys are the same, their code is not.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedArchitectureError

# HF ``projector_hidden_act`` values seen on projector checkpoints. "gelu" is the exact (erf) GELU.
_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
}


def _square_side(num_tokens: int, kind: str) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ConfigError(
            f"{kind} projector needs a square grid of image tokens, got {num_tokens}; "
            "feed it the patch tokens only (drop the CLS token) from a square image"
        )
    return side


def _tokens_to_grid(x: torch.Tensor, kind: str) -> torch.Tensor:
    b, n, c = x.shape
    side = _square_side(n, kind)
    # Token i sits at row i // side, column i % side: the vision tower's row-major patch order.
    return x.transpose(1, 2).reshape(b, c, side, side)  # [B, C, H, W]


def _grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # [B, H*W, C]


# --- LLaVA ----------------------------------------------------------------------------------------

class LinearProjector(nn.Linear):
    """``linear``: one ``nn.Linear(vision_hidden, text_hidden)``; N tokens in, N tokens out.

    A subclass of ``nn.Linear`` rather than a wrapper so the keys are ``weight`` / ``bias``, as in
    LLaVA-1's ``model.mm_projector.weight``.
    """

    def __init__(self, vision_hidden: int, text_hidden: int, bias: bool = True, device=None, dtype=None):
        super().__init__(vision_hidden, text_hidden, bias=bias, device=device, dtype=dtype)


class MLPGeluProjector(nn.Module):
    """``mlpNx_gelu``: ``linear_1`` -> act -> ``linear_2`` -> ... -> act -> ``linear_N``; N tokens in, N out.

    ``linear_1`` maps ``vision_hidden`` to ``text_hidden``; the others are ``text_hidden`` square.
    With ``depth=2`` this is Hugging Face's ``LlavaMultiModalProjector`` (LLaVA-1.5, LLaVA-OneVision):
    ``act`` is ``projector_hidden_act`` and ``bias`` is ``multimodal_projector_bias``. When several
    vision layers are concatenated, pass their summed width as ``vision_hidden``.
    """

    def __init__(self, vision_hidden: int, text_hidden: int, depth: int = 2, hidden_act: str = "gelu",
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        if depth < 1:
            raise UnsupportedArchitectureError(f"mlpNx_gelu projector needs N >= 1, got N={depth}")
        if hidden_act not in _ACTIVATIONS:
            raise ConfigError(
                f"unknown projector_hidden_act {hidden_act!r}; supported: {', '.join(sorted(_ACTIVATIONS))}"
            )
        self.depth = depth
        self.hidden_act = hidden_act
        self._act = _ACTIVATIONS[hidden_act]
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias, device=device, dtype=dtype)
        for i in range(2, depth + 1):
            self.add_module(f"linear_{i}", nn.Linear(text_hidden, text_hidden, bias=bias, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        for i in range(2, self.depth + 1):
            x = getattr(self, f"linear_{i}")(self._act(x))
        return x


# --- MobileVLM building blocks ---------------------------------------------------------------------

def _round_channels(v: float, divisor: int = 8) -> int:
    """MobileNet channel rounding: nearest multiple of ``divisor``, never more than 10% below ``v``."""
    rounded = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * v else rounded


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a ``[B, C, H, W]`` map (MobileVLM uses it in place of BatchNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _ConvNorm(nn.Sequential):
    """Bias-free conv, channel LayerNorm, optional hardswish — keys ``0.weight``, ``1.weight``, ``1.bias``."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 hardswish: bool = True, device=None, dtype=None):
        layers = [
            nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False,
                      device=device, dtype=dtype),
            _ChannelLayerNorm(cout, eps=1e-5, device=device, dtype=dtype),
        ]
        if hardswish:
            layers.append(nn.Hardswish())
        super().__init__(*layers)


class _SqueezeExcite(nn.Module):
    """Channel gate: mean over H, W -> 1x1 conv ``fc1`` -> ReLU -> 1x1 conv ``fc2`` -> hard sigmoid."""

    def __init__(self, channels: int, squeeze: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1, device=device, dtype=dtype)
        self.fc2 = nn.Conv2d(squeeze, channels, 1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean(dim=(2, 3), keepdim=True)  # [B, C, 1, 1]
        gate = F.hardsigmoid(self.fc2(F.relu(self.fc1(gate))))
        return x * gate


class _MobileBlock(nn.Module):
    """MobileNetV3 inverted residual without expansion, as MobileVLM configures it.

    ``block.0``: depthwise 3x3 conv (stride 1 or 2) + LN + hardswish; ``block.1``: squeeze-excitation
    to ``round8(C / 4)`` channels; ``block.2``: pointwise 1x1 conv + LN. A skip connection only when
    the stride is 1 (channels never change here).
    """

    def __init__(self, channels: int, stride: int, device=None, dtype=None):
        super().__init__()
        self.residual = stride == 1
        self.block = nn.Sequential(
            _ConvNorm(channels, channels, 3, stride, groups=channels, device=device, dtype=dtype),
            _SqueezeExcite(channels, _round_channels(channels // 4), device=device, dtype=dtype),
            _ConvNorm(channels, channels, 1, hardswish=False, device=device, dtype=dtype),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class _GeluMLP(nn.Sequential):
    """Linear -> GELU -> Linear; ``lead_identity`` shifts the keys to ``1``/``3`` as in MobileVLM v1."""

    def __init__(self, cin: int, cout: int, lead_identity: bool, device=None, dtype=None):
        layers = [nn.Linear(cin, cout, device=device, dtype=dtype), nn.GELU(),
                  nn.Linear(cout, cout, device=device, dtype=dtype)]
        super().__init__(*([nn.Identity()] if lead_identity else []), *layers)


class _LDPBody(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, device=None, dtype=None):
        super().__init__()
        self.mlp = _GeluMLP(vision_hidden, text_hidden, lead_identity=True, device=device, dtype=dtype)
        # The leading Identity only keeps the checkpoint's indices (mb_block.1, mb_block.2).
        self.mb_block = nn.Sequential(
            nn.Identity(),
            _MobileBlock(text_hidden, stride=1, device=device, dtype=dtype),
            _MobileBlock(text_hidden, stride=2, device=device, dtype=dtype),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # [B, N, text_hidden]
        x = self.mb_block(_tokens_to_grid(x, "ldp"))  # [B, text_hidden, ceil(H/2), ceil(W/2)]
        return _grid_to_tokens(x)


class LDPProjector(nn.Module):
    """``ldp`` (MobileVLM v1, config spelling ``ldpnet``): 576 tokens (24x24) in, 144 (12x12) out.

    1. ``model.mlp``: Linear(vision_hidden -> text_hidden), GELU, Linear(text_hidden -> text_hidden),
       applied per token (keys ``model.mlp.1``, ``model.mlp.3``).
    2. Tokens -> ``[B, C, 24, 24]`` grid.
    3. ``model.mb_block.1``: MobileNetV3 block, stride 1, with skip: depthwise 3x3 conv + LN + hardswish,
       squeeze-excitation (ReLU, hard sigmoid), pointwise conv + LN.
    4. ``model.mb_block.2``: the same block with a stride-2 depthwise conv and no skip: 24x24 -> 12x12.
    5. Grid -> tokens. In general N = S*S tokens become ceil(S/2)^2.

    The LayerNorms normalise over channels (eps 1e-5); the convs have no bias, the SE's 1x1 convs do.
    ``text_hidden`` must be a multiple of 8, as MobileNet's channel rounding would otherwise change it.
    """

    def __init__(self, vision_hidden: int, text_hidden: int, device=None, dtype=None):
        super().__init__()
        if text_hidden % 8:
            raise ConfigError(f"ldp projector needs text hidden size divisible by 8, got {text_hidden}")
        # ``model`` mirrors the upstream wrapper, so keys read ``model.mlp.1.weight`` etc.
        self.model = _LDPBody(vision_hidden, text_hidden, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _TokenMLP(nn.Module):
    def __init__(self, cin: int, cout: int, device=None, dtype=None):
        super().__init__()
        self.mlp = _GeluMLP(cin, cout, lead_identity=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class _PositionConv(nn.Module):
    """Depthwise 3x3 conv with bias added back onto its input (a conditional position encoding)."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.peg = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, padding=1, groups=channels, device=device, dtype=dtype)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = _tokens_to_grid(x, "ldpv2")
        return _grid_to_tokens(self.peg(grid) + grid)


class LDPv2Projector(nn.Module):
    """``ldpv2`` (MobileVLM_V2, config spelling ``ldpnetv2``): 576 tokens (24x24) in, 144 (12x12) out.

    1. ``mlp.mlp``: Linear(vision_hidden -> text_hidden), GELU, Linear(text_hidden -> text_hidden)
       per token (keys ``mlp.mlp.0``, ``mlp.mlp.2``).
    2. Adaptive average pooling of the token grid to ``out_grid`` x ``out_grid`` (12x12) — no weights.
    3. ``peg.peg.0``: depthwise 3x3 conv (with bias), added to its input as a residual.

    Any square N = S*S tokens in give ``out_grid**2`` tokens out.
    """

    def __init__(self, vision_hidden: int, text_hidden: int, out_grid: int = 12, device=None, dtype=None):
        super().__init__()
        self.out_grid = out_grid
        self.mlp = _TokenMLP(vision_hidden, text_hidden, device=device, dtype=dtype)
        self.peg = _PositionConv(text_hidden, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # [B, N, text_hidden]
        x = F.adaptive_avg_pool2d(_tokens_to_grid(x, "ldpv2"), self.out_grid)  # [B, C, 12, 12]
        return self.peg(_grid_to_tokens(x))  # [B, 144, text_hidden]


# --- registry -------------------------------------------------------------------------------------

PROJECTORS: dict[str, type[nn.Module]] = {
    "linear": LinearProjector,
    "mlp2x_gelu": MLPGeluProjector,
    "ldp": LDPProjector,
    "ldpv2": LDPv2Projector,
}

# Other spellings of the same projectors found in checkpoint configs.
ALIASES = {"ldpnet": "ldp", "ldpnetv2": "ldpv2"}

_MLP_GELU = re.compile(r"mlp(\d+)x_gelu")


def build_projector(kind: str, vision_hidden: int, text_hidden: int, **kw) -> nn.Module:
    """Build the projector named ``kind`` (an ``mm_projector_type`` value) from vision to text width.

    ``kw`` goes to the class: ``hidden_act`` / ``bias`` for the MLPs, ``out_grid`` for ``ldpv2``,
    ``device`` / ``dtype`` for all.
    """
    name = ALIASES.get(kind, kind)
    match = _MLP_GELU.fullmatch(name)
    if match:
        return MLPGeluProjector(vision_hidden, text_hidden, depth=int(match.group(1)), **kw)
    if name not in PROJECTORS:
        known = sorted([*PROJECTORS, *ALIASES, "mlpNx_gelu"])
        raise UnsupportedArchitectureError(f"unknown projector type {kind!r}; supported: {', '.join(known)}")
    return PROJECTORS[name](vision_hidden, text_hidden, **kw)
