"""Loading images from paths, bytes, data URLs, http(s) URLs, PIL images and arrays.

See :mod:`pocketvlm.image` for the public API and its guarantees.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import struct
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pocketvlm.errors import ImageError

DEFAULT_MAX_PIXELS = 64_000_000  # 64 megapixels, e.g. 8000 x 8000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# Formats pillow decodes in-process (JPEG covers phones' MPO); EPS etc. would run external programs.
SAFE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_DATA_URL = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),(.*)$", re.S)


def load_image(
    src: Any,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = 10.0,
    allow_remote: bool = True,
    allow_local_files: bool = True,
    validate_url: Callable[[str], Any] | None = None,
) -> Image.Image:
    """Load ``src`` as an RGB PIL image with EXIF orientation applied (see module docstring)."""
    if isinstance(src, Image.Image):
        img = src
        _check_pixels(img.size, max_pixels, "the given PIL image")
        _load_pixels(img, "the given PIL image")
    elif isinstance(src, np.ndarray):
        img = _from_array(src)
        _check_pixels(img.size, max_pixels, "the given array")
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        _check_bytes(len(data), max_bytes, "the image bytes")
        img = _decode(data, "the image bytes", max_pixels)
    elif isinstance(src, (str, Path)):
        img = _load_str(src, max_pixels, max_bytes, timeout, allow_remote, allow_local_files, validate_url)
    else:
        raise ImageError(
            f"cannot load an image from a {type(src).__name__}; pass a path, bytes, a data: or "
            "http(s): URL, a PIL image or a uint8 numpy array"
        )
    return to_rgb(_exif_transpose(img))


def _load_str(src, max_pixels, max_bytes, timeout, allow_remote, allow_local_files, validate_url):
    s = str(src)
    if isinstance(src, str) and s.startswith("data:"):
        what = "the data URL"
        return _decode(_decode_data_url(s, max_bytes), what, max_pixels)
    m = _SCHEME.match(s) if isinstance(src, str) else None
    if m is not None:
        scheme = m.group(1).lower()
        if scheme not in ("http", "https"):
            raise ImageError(
                f"unsupported URL scheme {scheme!r} in {_short(s)}; use http(s)://, a data:image/...;base64 URL "
                "or a local path"
            )
        if not allow_remote:
            raise ImageError(f"remote image URLs are disabled here: {_short(s)}; send the image inline as a data URL")
        what = f"the image at {_short(s)}"
        data = fetch_url(s, max_bytes=max_bytes, timeout=timeout, validate_url=validate_url)
        return _decode(data, what, max_pixels)
    if not allow_local_files:
        raise ImageError(f"local image paths are not accepted here: {_short(s)}; send a data URL or an http(s) URL")
    path = Path(s).expanduser()
    what = f"image file {str(path)!r}"
    if not path.exists():
        raise ImageError(f"image file not found: {str(path)!r}; check the path")
    if not path.is_file():
        raise ImageError(f"{str(path)!r} is not a file; check the path")
    _check_bytes(path.stat().st_size, max_bytes, what)
    return _decode(path.read_bytes(), what, max_pixels)


def fetch_url(
    url: str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = 10.0,
    validate_url: Callable[[str], Any] | None = None,
) -> bytes:
    """GET an http(s) URL and return at most ``max_bytes`` of body, else raise ImageError.

    ``timeout`` applies to connecting and to each read. ``validate_url`` sees the URL and each
    redirect target before it is requested.
    """
    _validate(url, validate_url)
    opener = urllib.request.build_opener(_ValidatingRedirect(validate_url))
    request = urllib.request.Request(url, headers={"User-Agent": "pocketvlm", "Accept": "image/*"})
    try:
        with opener.open(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit():
                _check_bytes(int(length), max_bytes, f"the image at {_short(url)}")
            data = resp.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise ImageError(f"could not fetch {_short(url)}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ImageError(f"could not fetch {_short(url)}: {reason}; check the URL and the network") from None
    _check_bytes(len(data), max_bytes, f"the image at {_short(url)}")
    return data


class _ValidatingRedirect(urllib.request.HTTPRedirectHandler):
    def __init__(self, validate_url):
        super().__init__()
        self._validate_url = validate_url

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _validate(newurl, self._validate_url)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _validate(url: str, validate_url) -> None:
    m = _SCHEME.match(url)
    if m is None or m.group(1).lower() not in ("http", "https"):
        raise ImageError(f"refusing to fetch {_short(url)}: only http(s) URLs can be fetched")
    if validate_url is None:
        return
    try:
        ok = validate_url(url)
    except ImageError:
        raise
    except Exception as e:  # the callback's own refusal, whatever type it chose
        raise ImageError(f"refusing to fetch {_short(url)}: {e}") from None
    if ok is False:
        raise ImageError(f"refusing to fetch {_short(url)}: the URL is not allowed")


def _decode_data_url(url: str, max_bytes: int) -> bytes:
    m = _DATA_URL.match(url)
    if m is None:
        raise ImageError("malformed data URL; expected data:image/<type>;base64,<data>")
    mime, params, payload = m.group(1).strip().lower(), m.group(2), m.group(3)
    if mime and not mime.startswith("image/"):
        raise ImageError(f"data URL has media type {mime!r}, not an image; expected data:image/<type>;base64,<data>")
    if ";base64" not in params.lower():
        raise ImageError("only base64 data URLs are supported; expected data:image/<type>;base64,<data>")
    payload = re.sub(r"\s+", "", payload)
    # Check the size before decoding so a huge payload is refused without a second huge copy.
    _check_bytes(len(payload) * 3 // 4, max_bytes, "the data URL")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"data URL is not valid base64 ({e}); re-encode the image with standard base64") from None


def _decode(data: bytes, what: str, max_pixels: int) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data), formats=SAFE_FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what} has too many pixels ({e}); downscale it first") from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{what} is not an image pillow can read (supported: {', '.join(SAFE_FORMATS)})"
        ) from None
    # Image.open only parsed the header: refuse oversize images before decoding their pixels.
    _check_pixels(img.size, max_pixels, what)
    _load_pixels(img, what)
    return img


def _load_pixels(img: Image.Image, what: str) -> None:
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageError(f"{what} is truncated or corrupt ({e}); re-save or re-send the image") from None


def _from_array(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))):
        raise ImageError(
            f"array images must be uint8 with shape (H, W), (H, W, 3) or (H, W, 4); got {a.dtype} {a.shape}"
        )
    a = a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a
    return Image.fromarray(np.ascontiguousarray(a))


def _check_pixels(size: tuple[int, int], max_pixels: int, what: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"{what} is empty ({w}x{h} pixels)")
    if w * h > max_pixels:
        raise ImageError(
            f"{what} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
            "(max_pixels); downscale it first"
        )


def _check_bytes(n: int, max_bytes: int, what: str) -> None:
    if n > max_bytes:
        raise ImageError(f"{what} is over the limit of {max_bytes:,} bytes (max_bytes); send a smaller image")


def _exif_transpose(img: Image.Image) -> Image.Image:
    try:
        if img.getexif().get(0x0112, 1) == 1:  # upright already: no copy (exif_transpose would return one)
            return img
        return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, struct.error):
        # A malformed EXIF block says nothing reliable about orientation; the pixels are fine.
        return img


def _short(s: str, n: int = 80) -> str:
    return repr(s if len(s) <= n else s[: n - 3] + "...")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert to RGB the way transformers' ``convert_to_rgb`` does: transparency goes onto white."""
    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def image_hash(img: Image.Image) -> str:
    """sha256 hex digest of mode, size and pixel bytes: equal pixels give equal hashes."""
    w, height = img.size
    h = hashlib.sha256(f"{img.mode}:{w}x{height}:".encode())
    rows = max(1, (4 << 20) // max(1, w * len(img.getbands())))  # ~4 MB of rows at a time, not a full copy
    for top in range(0, height, rows):  # row strips: their bytes in order are the image's tobytes()
        h.update(img.crop((0, top, w, min(top + rows, height))).tobytes())
    return h.hexdigest()
