"""Image loading and preprocessing for the vision encoders (pillow + numpy + torch only).

Public API (stable; the models call these):

``load_image(src, *, max_pixels=DEFAULT_MAX_PIXELS, max_bytes=DEFAULT_MAX_BYTES, timeout=10.0,
allow_remote=True, allow_local_files=True, validate_url=None) -> PIL.Image.Image``
    ``src`` is a path (str or pathlib.Path), raw bytes, a ``data:image/...;base64,...`` URL, an
    ``http(s)://`` URL, a ``PIL.Image.Image`` or a uint8 numpy array (H, W[, C]). The result is an
    RGB image with its EXIF orientation applied. Every bad input raises
    :class:`pocketvlm.errors.ImageError`. Guards: at most ``max_bytes`` of encoded data (default
    64 MiB) and at most ``max_pixels`` pixels (default 64 megapixels, checked from the header
    before any pixel is decoded; pillow's own ``DecompressionBombError`` above
    2 x ``PIL.Image.MAX_IMAGE_PIXELS`` also still applies). Only raster formats that pillow decodes
    by itself are opened (JPEG incl. MPO, PNG, WebP, GIF, BMP, TIFF, PPM), never EPS/PDF which would run
    external programs. A server handling untrusted input should pass ``allow_local_files=False``
    and a ``validate_url`` callback, which is called with the URL and with every redirect target
    before it is requested and refuses it by returning False or raising.

``image_hash(img) -> str``: sha256 hex over mode, size and pixel bytes, for caching encoded images.

``ImageProcessorConfig``: frozen dataclass built with ``from_dict`` from a Hugging Face
``preprocessor_config.json`` dict (unknown keys ignored; missing keys take the defaults of the
named transformers processor class), or with ``.clip(336)``, ``.siglip(384)``, ``.llava(336)``,
``.llava_onevision()`` for checkpoints that ship no such file.

``preprocess(image, config, dtype=torch.float32, device=None) -> PreprocessedImage``
    ``image`` is anything ``load_image`` accepts. Returns ``pixel_values`` [n_tiles, 3, H, W]
    (n_tiles is 1 except for LLaVA-OneVision's anyres tiling, where tile 0 is the whole image)
    and ``image_size`` = the (height, width) of the loaded RGB image. The image goes through
    ``load_image`` (so EXIF orientation and RGB conversion always apply) with its default limits,
    except that a PIL image or array passed in is not held to ``max_pixels``: load with your own
    limits first, then pass the PIL image.

Building blocks, each a pure function on HWC uint8 arrays unless said: ``shortest_edge_size``,
``resize``, ``center_crop``, ``expand_to_square``, ``rescale`` and ``normalize`` (to float32),
``select_best_resolution``, ``resize_and_pad_for_tiling``, ``anyres_tiles``, ``onevision_pinpoints``.

The transforms reproduce the transformers 5 PIL backend (``*ImageProcessorPil``) number for
number: pillow does the resampling on uint8 pixels, rescale is done in float64 then cast to
float32, normalize in float32. RGB conversion composites any transparency onto white, as
transformers' ``convert_to_rgb`` does. Images are handled as HWC uint8 arrays until the final
float conversion, where they become CHW.
"""

from pocketvlm.image.load import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    SAFE_FORMATS,
    fetch_url,
    image_hash,
    load_image,
    to_rgb,
)
from pocketvlm.image.process import (
    ImageProcessorConfig,
    PreprocessedImage,
    anyres_tiles,
    center_crop,
    expand_to_square,
    normalize,
    onevision_pinpoints,
    preprocess,
    rescale,
    resize,
    resize_and_pad_for_tiling,
    select_best_resolution,
    shortest_edge_size,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "SAFE_FORMATS",
    "ImageProcessorConfig",
    "PreprocessedImage",
    "anyres_tiles",
    "center_crop",
    "expand_to_square",
    "fetch_url",
    "image_hash",
    "load_image",
    "normalize",
    "onevision_pinpoints",
    "preprocess",
    "rescale",
    "resize",
    "resize_and_pad_for_tiling",
    "select_best_resolution",
    "shortest_edge_size",
    "to_rgb",
]
