"""LLaVA-OneVision (e.g. llava-onevision-qwen2-0.5b-ov-hf: SigLIP + Qwen2), as HF's
``LlavaOnevisionForConditionalGeneration``. Everything of :mod:`.llava`, plus:

- anyres tiling: the image processor yields the whole image resized to one tile, then the tiles of the image
  fitted into the best ``image_grid_pinpoints`` resolution (``pocketvlm.image.preprocess`` does this);
- all tiles go through the tower (last layer, ``"full"``: SigLIP has no class token) and the projector;
- ``pack``: the tile features are laid out as one ``[C, rows*grid, cols*grid]`` map, the padding the
  resize-and-pad added is cut off again (``unpad``), and if the map is larger than ``anyres_max_N`` allows
  (``sqrt(h*w / (N * grid^2)) > 1.1``) it is shrunk with bilinear interpolation; a learned ``image_newline``
  is appended to every row, and the base tile's features go first;
- an image with a single tile (or any image of a multi-image prompt, which HF encodes from the base tile
  only) is the base features followed by one ``image_newline``.

``num_image_tokens(image_size)`` reproduces HF's processor count for the same image.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ImageError
from ..image import select_best_resolution
from . import llava


@dataclass(frozen=True)
class Config(llava.Config):
    image_token_index: int = 151646
    vision_feature_layer: int | tuple = -1
    vision_feature_select_strategy: str = "full"
    image_grid_pinpoints: tuple | None = None
    vision_aspect_ratio: str = "anyres_max_9"

    @classmethod
    def from_dict(cls, d: dict, **overrides):
        cfg = super().from_dict(d, **overrides)
        if not cfg.image_grid_pinpoints:
            raise ConfigError("llava_onevision config lacks image_grid_pinpoints")
        if not cfg.vision_aspect_ratio.startswith("anyres_max_"):
            raise ConfigError(f"unsupported vision_aspect_ratio {cfg.vision_aspect_ratio!r}; expected anyres_max_N")
        pins = tuple(tuple(int(x) for x in p) for p in cfg.image_grid_pinpoints)
        return dataclasses.replace(cfg, image_grid_pinpoints=pins)

    @property
    def max_tiles(self) -> int:
        return int(self.vision_aspect_ratio[len("anyres_max_"):])


def unpad(feature: torch.Tensor, image_size) -> torch.Tensor:
    """Cut the rows/columns of ``feature`` ``[C, H, W]`` that correspond to the letterbox padding."""
    oh, ow = image_size
    _, ch, cw = feature.shape
    if ow / oh > cw / ch:
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        return feature[:, pad:ch - pad, :]
    new_w = int(round(ow * (ch / oh), 7))
    pad = (cw - new_w) // 2
    return feature[:, :, pad:cw - pad]


class Model(llava.Model):
    def __init__(self, cfg: Config, max_seq_len: int | None = None):
        super().__init__(cfg, max_seq_len)
        self.model.image_newline = nn.Parameter(torch.empty(cfg.text_config.hidden_size))

    @property
    def tile(self) -> int:
        return self.config.vision_config.image_size

    @property
    def grid(self) -> int:
        return self.config.vision_config.grid

    def tile_grid(self, image_size) -> tuple[int, int]:
        h, w = select_best_resolution(tuple(int(x) for x in image_size), self.config.image_grid_pinpoints)
        return h // self.tile, w // self.tile

    def num_tiles(self, image_size) -> int:
        rows, cols = self.tile_grid(image_size)
        return rows * cols + 1

    def encode_images(self, pixel_values, image_sizes=None, multi_image: bool = False) -> list[torch.Tensor]:
        """One image's tiles ``[n_tiles, 3, H, W]``, a list of those, or HF's padded ``[n_images, max_tiles, 3, H, W]``
        -> a list of packed features ``[n_tokens_i, text_hidden]``, one per image. ``image_sizes`` holds each
        image's original (height, width). ``multi_image`` encodes each image from its base tile only, as HF
        does for a prompt with several images."""
        if image_sizes is None:
            raise ImageError("LLaVA-OneVision needs image_sizes (the original height, width of each image)")
        if isinstance(pixel_values, torch.Tensor):
            if pixel_values.dim() == 4:
                pixel_values = [pixel_values]
            elif pixel_values.dim() != 5:
                raise ImageError(f"pixel_values must have 4 or 5 dimensions, got shape {tuple(pixel_values.shape)}")
        if len(pixel_values) != len(image_sizes):
            raise ImageError(f"{len(pixel_values)} images but {len(image_sizes)} image sizes")
        counts = [1 if multi_image else self.num_tiles(s) for s in image_sizes]
        tiles = []
        for pv, n in zip(pixel_values, counts):
            if pv.shape[0] < n:
                raise ImageError(f"an image has {pv.shape[0]} tiles but its size needs {n}; preprocess it with this "
                                 "model's image processor (image_grid_pinpoints)")
            tiles.append(pv[:n])  # drops HF's batch padding
        p = self.model.multi_modal_projector.linear_1.weight
        feats = self.model.multi_modal_projector(self.image_hidden_states(torch.cat(tiles).to(p.device, p.dtype)))
        return [self.pack(f, s) for f, s in zip(feats.split(counts), image_sizes)]

    def pack(self, feats: torch.Tensor, image_size) -> torch.Tensor:
        """Tile features ``[n_tiles, grid*grid, D]`` of one image -> ``[n_tokens, D]`` (see module docstring)."""
        newline = self.model.image_newline.to(feats.dtype)
        if feats.shape[0] == 1:
            return torch.cat([feats[0], newline[None]])
        g = self.grid
        base_feats, tiles = feats[0], feats[1:]
        rows, cols = self.tile_grid(image_size)
        x = tiles.view(rows, cols, g, g, -1).permute(4, 0, 2, 1, 3).reshape(tiles.shape[-1], rows * g, cols * g)
        x = unpad(x, image_size)
        c, h, w = x.shape
        ratio = math.sqrt(h * w / (self.config.max_tiles * g ** 2))
        if ratio > 1.1:
            x = F.interpolate(x[None], [int(h // ratio), int(w // ratio)], mode="bilinear")[0]
        x = torch.cat([x, newline[:, None, None].expand(c, x.shape[1], 1)], dim=-1)  # a newline ends every row
        return torch.cat([base_feats, x.flatten(1).T])

    def num_image_tokens(self, image_size, multi_image: bool = False) -> int:
        """Feature rows for an image of (height, width) ``image_size``: HF's processor count, without the tower."""
        g = self.grid
        n_base = g * g
        if multi_image:
            return n_base + 1
        rows, cols = self.tile_grid(image_size)
        oh, ow = image_size
        h, w = rows * g, cols * g
        if ow / oh > w / h:
            h -= ((h - int(round(oh * (w / ow), 7))) // 2) * 2
        else:
            w -= ((w - int(round(ow * (h / oh), 7))) // 2) * 2
        ratio = math.sqrt(h * w / (self.config.max_tiles * g ** 2))
        if ratio > 1.1:
            h, w = int(h // ratio), int(w // ratio)
        return n_base + h * (w + 1)


def sanitize(weights: dict, cfg: Config) -> dict:
    return llava.sanitize(weights, cfg)
