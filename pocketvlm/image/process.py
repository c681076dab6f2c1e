"""Preprocessing as short pure functions, reproducing the transformers 5 PIL image processors.

Arrays are HWC uint8 until ``rescale``/``normalize``; ``preprocess`` returns CHW tensors.
See :mod:`pocketvlm.image` for the public API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from pocketvlm.errors import ConfigError
from pocketvlm.image.load import load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC; the codes are the ones in preprocessor_config.json


def onevision_pinpoints(tile: int = 384, max_tiles_per_side: int = 6) -> tuple[tuple[int, int], ...]:
    """LLaVA-OneVision's grid: every (i*tile, j*tile) for i, j in 1..max_tiles_per_side, row-major."""
    n = range(1, max_tiles_per_side + 1)
    return tuple((i * tile, j * tile) for i in n for j in n)


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) with the short side set to ``shortest_edge``; the long side is truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def resize(img: np.ndarray, size: tuple[int, int], resample: int = BICUBIC) -> np.ndarray:
    """Resize HWC uint8 ``img`` to (height, width) with pillow's filter ``resample``."""
    height, width = size
    return np.asarray(Image.fromarray(img).resize((width, height), resample=resample))


def center_crop(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Crop the centre (height, width); a side shorter than the crop is zero-padded (as transformers)."""
    h, w = img.shape[:2]
    ch, cw = size
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return img[top : top + ch, left : left + cw]
    nh, nw = max(ch, h), max(cw, w)
    canvas = np.zeros((nh, nw) + img.shape[2:], dtype=img.dtype)
    pad_top, pad_left = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    canvas[pad_top : pad_top + h, pad_left : pad_left + w] = img
    top, left = top + pad_top, left + pad_left
    return canvas[max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]


def expand_to_square(img: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    """LLaVA-1.5's pad: centre ``img`` on a square of colour ``fill`` whose side is the long edge."""
    h, w = img.shape[:2]
    if h == w:
        return img
    side = max(h, w)
    out = np.empty((side, side, img.shape[2]), dtype=img.dtype)
    out[...] = np.asarray(fill, dtype=img.dtype)
    if w > h:
        top = (side - h) // 2
        out[top : top + h] = img
    else:
        left = (side - w) // 2
        out[:, left : left + w] = img
    return out


def rescale(img: np.ndarray, factor: float) -> np.ndarray:
    """``img * factor`` as float32; the product is taken in float64 first, as transformers does."""
    return (img.astype(np.float64) * factor).astype(np.float32)


def normalize(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(img - mean) / std per channel (last axis), in float32."""
    x = img if np.issubdtype(img.dtype, np.floating) else img.astype(np.float32)
    return (x - np.asarray(mean, dtype=x.dtype)) / np.asarray(std, dtype=x.dtype)


def select_best_resolution(image_size: tuple[int, int], resolutions: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (height, width) among ``resolutions`` that keeps the most of the image's pixels when
    the image is fitted inside it, ties broken by the least wasted area, then by list order."""
    h, w = image_size
    best, best_effective, best_wasted = None, 0, float("inf")
    for rh, rw in resolutions:
        scale = min(rw / w, rh / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        wasted = rw * rh - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (rh, rw), effective, wasted
    return best


def _fit_size(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    # Aspect-preserving size inside target; the fitted side is rounded up, never past the target.
    h, w = image_size
    th, tw = target
    if tw / w < th / h:
        return min(math.ceil(h * tw / w), th), tw
    return th, min(math.ceil(w * th / h), tw)


def resize_and_pad_for_tiling(img: np.ndarray, target: tuple[int, int], resample: int = BICUBIC) -> np.ndarray:
    """Fit ``img`` inside (height, width) ``target`` keeping its aspect, then centre it on black."""
    nh, nw = _fit_size(img.shape[:2], target)
    fitted = resize(img, (nh, nw), resample)
    top, extra_h = divmod(target[0] - nh, 2)
    left, extra_w = divmod(target[1] - nw, 2)
    return np.pad(fitted, ((top, top + extra_h), (left, left + extra_w), (0, 0)))


def anyres_tiles(
    img: np.ndarray,
    grid_pinpoints: Sequence[Sequence[int]],
    tile_size: int,
    base_size: tuple[int, int],
    resample: int = BICUBIC,
) -> list[np.ndarray]:
    """LLaVA-OneVision anyres: [whole image resized to base_size] + row-major tiles of the image
    resized-and-padded to the best grid resolution."""
    best = select_best_resolution(img.shape[:2], grid_pinpoints)
    canvas = resize_and_pad_for_tiling(img, best, resample)
    tiles = [
        canvas[y : y + tile_size, x : x + tile_size]
        for y in range(0, canvas.shape[0], tile_size)
        for x in range(0, canvas.shape[1], tile_size)
    ]
    return [resize(img, base_size, resample)] + tiles


# ---------------------------------------------------------------------------------------------
# Config and entry point
# ---------------------------------------------------------------------------------------------

_CLIP_LIKE = dict(
    shortest_edge=224, size=None, crop_size=(224, 224), do_center_crop=True, image_mean=CLIP_MEAN, image_std=CLIP_STD
)
# Defaults of each supported transformers processor class, for keys a preprocessor_config.json omits.
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": dict(_CLIP_LIKE),
    "LlavaImageProcessor": dict(_CLIP_LIKE),
    "SiglipImageProcessor": dict(
        shortest_edge=None, size=(224, 224), crop_size=None, do_center_crop=False, image_mean=HALF, image_std=HALF
    ),
    "LlavaOnevisionImageProcessor": dict(
        shortest_edge=None, size=(384, 384), crop_size=None, do_center_crop=False, do_pad=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD, image_grid_pinpoints=onevision_pinpoints(),
    ),
}
# Multimodal processor names (the "processor_class" key) for files without "image_processor_type".
_FROM_PROCESSOR = {
    "CLIPProcessor": "CLIPImageProcessor",
    "SiglipProcessor": "SiglipImageProcessor",
    "LlavaProcessor": "LlavaImageProcessor",
    "LlavaOnevisionProcessor": "LlavaOnevisionImageProcessor",
}


@dataclass(frozen=True)
class ImageProcessorConfig:
    """What a Hugging Face image processor does, as plain values. Sizes are (height, width).

    Exactly one of ``shortest_edge`` (resize the short side, keep aspect) and ``size`` (resize to
    a fixed height and width) is set when ``do_resize``. ``do_pad`` means LLaVA-1.5's
    expand-to-square with the mean colour for LlavaImageProcessor; other classes ignore it.
    """

    processor_class: str = "CLIPImageProcessor"
    do_resize: bool = True
    shortest_edge: int | None = 224
    size: tuple[int, int] | None = None
    resample: int = BICUBIC
    do_center_crop: bool = True
    crop_size: tuple[int, int] | None = (224, 224)
    do_pad: bool = False
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    do_convert_rgb: bool = True
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self):
        if self.processor_class not in _CLASS_DEFAULTS:
            raise ConfigError(
                f"unsupported image processor {self.processor_class!r}; supported: {', '.join(_CLASS_DEFAULTS)}"
            )
        if self.do_resize and (self.shortest_edge is None) == (self.size is None):
            raise ConfigError("image processor config needs exactly one of size.shortest_edge or size.height/width")
        if self.do_center_crop and self.crop_size is None:
            raise ConfigError("image processor config sets do_center_crop but has no crop_size")
        if self.resample not in range(6):
            raise ConfigError(f"resample must be a PIL filter code 0..5, got {self.resample!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0 in self.image_std:
            raise ConfigError(f"image_mean/image_std must have 3 values and a non-zero std, got "
                              f"{self.image_mean}, {self.image_std}")
        if self.is_anyres and not self.image_grid_pinpoints:
            raise ConfigError("LlavaOnevisionImageProcessor config needs image_grid_pinpoints")

    @property
    def is_anyres(self) -> bool:
        return self.processor_class == "LlavaOnevisionImageProcessor"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], processor_class: str | None = None) -> "ImageProcessorConfig":
        """Build from a preprocessor_config.json dict. The class comes from ``processor_class`` if
        given, else "image_processor_type" (a Fast/Pil suffix is dropped), else "processor_class",
        else CLIPImageProcessor. Unknown keys are ignored; missing ones take that class's defaults."""
        name = processor_class or _class_name(d)
        if name not in _CLASS_DEFAULTS:
            raise ConfigError(f"unsupported image processor {name!r}; supported: {', '.join(_CLASS_DEFAULTS)}")
        kw: dict[str, Any] = {"processor_class": name, **_CLASS_DEFAULTS[name]}
        if d.get("size") is not None:
            kw["shortest_edge"], kw["size"] = _parse_size(d["size"])
        if "crop_size" in d:
            kw["crop_size"] = None if d["crop_size"] is None else _parse_hw(d["crop_size"], "crop_size")
        for key in ("do_resize", "do_center_crop", "do_pad", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(key) is not None:
                kw[key] = bool(d[key])
        if d.get("resample") is not None:
            kw["resample"] = int(d["resample"])
        if d.get("rescale_factor") is not None:
            kw["rescale_factor"] = float(d["rescale_factor"])
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                v = d[key]
                kw[key] = tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * 3
        if d.get("image_grid_pinpoints") is not None:
            kw["image_grid_pinpoints"] = tuple(_parse_hw(p, "image_grid_pinpoints") for p in d["image_grid_pinpoints"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in kw.items() if k in known})

    @classmethod
    def clip(cls, image_size: int = 336) -> "ImageProcessorConfig":
        """OpenAI CLIP ViT: short side to ``image_size``, centre crop, CLIP mean/std."""
        return cls(shortest_edge=image_size, crop_size=(image_size, image_size))

    @classmethod
    def llava(cls, image_size: int = 336) -> "ImageProcessorConfig":
        """LLaVA-1.5 / MobileVLM ``image_aspect_ratio="pad"``: CLIP after expand-to-square with the mean colour."""
        return cls(processor_class="LlavaImageProcessor", shortest_edge=image_size,
                   crop_size=(image_size, image_size), do_pad=True)

    @classmethod
    def siglip(cls, image_size: int = 384) -> "ImageProcessorConfig":
        """SigLIP: squash to image_size x image_size, mean/std 0.5."""
        return cls(processor_class="SiglipImageProcessor", shortest_edge=None, size=(image_size, image_size),
                   do_center_crop=False, crop_size=None, image_mean=HALF, image_std=HALF)

    @classmethod
    def llava_onevision(cls, tile: int = 384, max_tiles_per_side: int = 6) -> "ImageProcessorConfig":
        """llava-onevision-qwen2-*-ov-hf: SigLIP tiles of ``tile``, mean/std 0.5, grid up to 6x6 tiles."""
        return cls(processor_class="LlavaOnevisionImageProcessor", shortest_edge=None, size=(tile, tile),
                   do_center_crop=False, crop_size=None, do_pad=True, image_mean=HALF, image_std=HALF,
                   image_grid_pinpoints=onevision_pinpoints(tile, max_tiles_per_side))


def _class_name(d: Mapping[str, Any]) -> str:
    name = d.get("image_processor_type")
    if name:
        for suffix in ("Fast", "Pil"):
            name = name[: -len(suffix)] if name.endswith(suffix) else name
        return name
    if d.get("processor_class") in _FROM_PROCESSOR:
        return _FROM_PROCESSOR[d["processor_class"]]
    if d.get("feature_extractor_type") == "CLIPFeatureExtractor":
        return "CLIPImageProcessor"
    return "CLIPImageProcessor"


def _parse_hw(v: Any, what: str) -> tuple[int, int]:
    if isinstance(v, Mapping) and "height" in v and "width" in v:
        return int(v["height"]), int(v["width"])
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return int(v[0]), int(v[1])
    if isinstance(v, int):
        return v, v
    raise ConfigError(f"{what} must be {{'height': h, 'width': w}}, [h, w] or an int, got {v!r}")


def _parse_size(v: Any) -> tuple[int | None, tuple[int, int] | None]:
    """(shortest_edge, (height, width)) from a size entry; an int means shortest edge, as in transformers."""
    if isinstance(v, int):
        return v, None
    if isinstance(v, Mapping) and set(v) == {"shortest_edge"}:
        return int(v["shortest_edge"]), None
    if isinstance(v, Mapping) and "shortest_edge" in v:
        raise ConfigError(f"size {dict(v)!r} combines shortest_edge with other limits, which is not supported")
    return None, _parse_hw(v, "size")


@dataclass(frozen=True)
class PreprocessedImage:
    """``pixel_values`` [n_tiles, 3, H, W] and the loaded image's (height, width)."""

    pixel_values: torch.Tensor
    image_size: tuple[int, int]


def preprocess(
    image: Any,
    config: ImageProcessorConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> PreprocessedImage:
    """Load ``image`` (anything ``load_image`` takes) and turn it into the vision encoder's input.

    The image is always converted to RGB (the encoders take 3 channels), whatever ``do_convert_rgb`` says.
    A PIL image or array is the caller's already, so the pixel limit is not applied to it; other
    sources get ``load_image``'s default limits.
    """
    if isinstance(image, Image.Image):
        img = load_image(image, max_pixels=max(image.width * image.height, 1))
    elif isinstance(image, np.ndarray):
        img = load_image(image, max_pixels=max(image.size, 1))
    else:
        img = load_image(image)
    w, h = img.size
    c = config
    if c.is_anyres:
        base = c.size if c.size is not None else (c.shortest_edge, c.shortest_edge)
        tile = c.crop_size[0] if c.crop_size is not None else base[0]
        crops = anyres_tiles(np.asarray(img), c.image_grid_pinpoints, tile, base, c.resample)
    elif c.processor_class == "LlavaImageProcessor" and c.do_pad:
        # int() truncates, as LLaVA-1.5 and transformers do: CLIP's mean becomes (122, 116, 104).
        crops = [_pil_expand_to_square(img, [int(m * 255) for m in c.image_mean])]
    else:
        crops = [img]
    pixels = np.stack([_finish(crop, c) for crop in crops])  # [n, H, W, 3]
    pixel_values = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    return PreprocessedImage(pixel_values.to(device=device, dtype=dtype), (h, w))


def _pil_expand_to_square(img: Image.Image, fill: Sequence[int]) -> Image.Image:
    """:func:`expand_to_square` on a PIL image (the same pixels, without a full-size array copy)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), tuple(fill))
    out.paste(img, ((side - w) // 2 if w < h else 0, (side - h) // 2 if w > h else 0))
    return out


def _finish(img: np.ndarray | Image.Image, c: ImageProcessorConfig) -> np.ndarray:
    if isinstance(img, Image.Image):
        # a full-size image is resized by PIL directly (what :func:`resize` does after its array round trip, so
        # the same pixels), and becomes an array only at the tower's size: a 25-megapixel upload costs no
        # full-size copies beyond its decoding
        if c.do_resize:
            size = c.size if c.size is not None else shortest_edge_size(img.height, img.width, c.shortest_edge)
            img = img.resize((size[1], size[0]), resample=c.resample)
        img = np.asarray(img)
    elif c.do_resize:
        h, w = img.shape[:2]
        size = c.size if c.size is not None else shortest_edge_size(h, w, c.shortest_edge)
        img = resize(img, size, c.resample)
    if c.do_center_crop:
        img = center_crop(img, c.crop_size)
    x = rescale(img, c.rescale_factor) if c.do_rescale else img
    if c.do_normalize:
        x = normalize(x, c.image_mean, c.image_std)
    return x.astype(np.float32, copy=False)
