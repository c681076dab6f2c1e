"""Tests for pocketvlm.image: loading (every bad input), and parity with transformers' PIL processors."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from pocketvlm.errors import ConfigError, ImageError
from pocketvlm.image import (
    ImageProcessorConfig,
    image_hash,
    load_image,
    preprocess,
    select_best_resolution,
    shortest_edge_size,
)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny bogus IDAT: decoding it would fail."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def small_rgb() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# Loading: every accepted source
# ---------------------------------------------------------------------------------------------


def test_load_from_path_str_pathlib_bytes_data_url_pil_and_array(tmp_path, small_rgb):
    data = _png_bytes(small_rgb)
    p = tmp_path / "img.png"
    p.write_bytes(data)
    data_url = "data:image/png;base64," + base64.b64encode(data).decode()
    expected = np.asarray(small_rgb)
    for src in (str(p), p, data, bytearray(data), data_url, small_rgb, expected):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (32, 24)
        np.testing.assert_array_equal(np.asarray(img), expected)


def test_data_url_with_line_breaks_in_base64(small_rgb):
    b64 = base64.encodebytes(_png_bytes(small_rgb)).decode()  # wrapped at 76 columns
    img = load_image("data:image/png;base64," + b64)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(small_rgb))


def test_one_pixel_image_loads_and_preprocesses_with_every_pipeline():
    img = load_image(_png_bytes(Image.new("RGB", (1, 1), (10, 200, 30))))
    assert img.size == (1, 1)
    for cfg in (
        ImageProcessorConfig.clip(336),
        ImageProcessorConfig.siglip(384),
        ImageProcessorConfig.llava(336),
        ImageProcessorConfig.llava_onevision(),
    ):
        out = preprocess(img, cfg)
        assert out.image_size == (1, 1)
        side = cfg.crop_size[0] if cfg.do_center_crop else cfg.size[0]
        assert tuple(out.pixel_values.shape[1:]) == (3, side, side)
        assert torch.isfinite(out.pixel_values).all()
    # A single colour stays a single colour through every resize.
    px = preprocess(img, ImageProcessorConfig.siglip(384)).pixel_values[0]
    expected = (torch.tensor([10, 200, 30]) / 255 - 0.5) / 0.5
    torch.testing.assert_close(px[:, 100, 200], expected, atol=1e-6, rtol=0)


def test_exif_orientation_6_is_applied():
    # 40 wide x 20 tall, left half red. Orientation 6 = "rotate 90 degrees clockwise to display".
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    img = load_image(_jpeg_bytes(Image.fromarray(a), exif=exif.tobytes()))
    assert img.size == (20, 40)  # now 20 wide, 40 tall
    px = np.asarray(img).astype(int)
    assert px[5, 10, 0] > 200 and px[5, 10, 1] < 60  # top half red: the left edge went to the top
    assert px[35, 10, 0] < 60  # bottom half black


def test_rgba_is_composited_on_white_and_palette_transparency_too():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 255, 255]
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert np.asarray(load_image(half))[0, 0].tolist() == [127, 127, 127]
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.info["transparency"] = 1
    assert np.asarray(load_image(_png_bytes(p)))[0, 0].tolist() == [255, 255, 255]


def test_image_hash_depends_on_pixels_mode_and_size():
    a = np.arange(36, dtype=np.uint8).reshape(2, 6, 3)
    img = Image.fromarray(a)
    assert image_hash(img) == image_hash(Image.fromarray(a.copy()))
    b = a.copy()
    b[1, 5, 2] ^= 1
    assert image_hash(img) != image_hash(Image.fromarray(b))
    assert image_hash(img) != image_hash(Image.fromarray(a.reshape(6, 2, 3)))  # same bytes, other size
    assert image_hash(img.convert("RGBA")) != image_hash(img)
    assert len(image_hash(img)) == 64


# ---------------------------------------------------------------------------------------------
# Loading: every bad input has its error
# ---------------------------------------------------------------------------------------------


def test_missing_file_says_check_the_path(tmp_path):
    with pytest.raises(ImageError, match="not found.*check the path"):
        load_image(tmp_path / "nope.jpg")


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="not a file"):
        load_image(str(tmp_path))


def test_text_file_named_jpg_is_not_an_image(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a jpeg\n")
    with pytest.raises(ImageError, match="not an image pillow can read"):
        load_image(p)


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(1)
    data = _jpeg_bytes(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(p)


def test_20000x20000_image_is_refused_from_its_header():
    with pytest.raises(ImageError, match="too many pixels|over the limit"):
        load_image(_png_header_only(20000, 20000))


def test_pixel_limit_is_checked_before_decoding():
    # 9000 x 9000 = 81 MP: over our 64 MP default, under pillow's own limits. The pixel data is
    # bogus, so reaching the decoder would give "truncated or corrupt" instead of the limit.
    with pytest.raises(ImageError, match=r"9000x9000 = 81,000,000 pixels, over the limit of 64,000,000"):
        load_image(_png_header_only(9000, 9000))
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(_png_header_only(90, 90))
    with pytest.raises(ImageError, match="over the limit of 100 "):
        load_image(Image.new("RGB", (20, 20)), max_pixels=100)


def test_too_many_bytes(tmp_path, small_rgb):
    data = _png_bytes(small_rgb)
    p = tmp_path / "img.png"
    p.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    for src in (data, p, url):
        with pytest.raises(ImageError, match="over the limit of 100 bytes"):
            load_image(src, max_bytes=100)


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "file:///etc/passwd", "gopher://x/y"])
def test_unsupported_url_scheme(url):
    with pytest.raises(ImageError, match="unsupported URL scheme"):
        load_image(url)


def test_invalid_base64_data_url():
    with pytest.raises(ImageError, match="not valid base64"):
        load_image("data:image/png;base64,iVBORw0KGgo!!!not*base64")


def test_data_url_without_base64_or_with_other_media_type():
    with pytest.raises(ImageError, match="only base64"):
        load_image("data:image/png,rawbytes")
    with pytest.raises(ImageError, match="not an image"):
        load_image("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(ImageError, match="malformed data URL"):
        load_image("data:image/png;base64")


def test_wrong_python_type_and_bad_array():
    with pytest.raises(ImageError, match="cannot load an image from a int"):
        load_image(42)
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))


def test_local_paths_and_remote_urls_can_be_disabled(tmp_path, small_rgb):
    p = tmp_path / "img.png"
    p.write_bytes(_png_bytes(small_rgb))
    with pytest.raises(ImageError, match="local image paths are not accepted"):
        load_image(str(p), allow_local_files=False)
    with pytest.raises(ImageError, match="remote image URLs are disabled"):
        load_image("http://127.0.0.1:9/x.png", allow_remote=False)


# ---------------------------------------------------------------------------------------------
# Loading over http from a throwaway server on loopback
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http_server(small_rgb):
    png = _png_bytes(small_rgb)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/img.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/img.png")
                self.end_headers()
            elif self.path == "/slow":
                time.sleep(1.5)
                self.send_response(200)
                self.end_headers()
            else:
                self.send_error(404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", small_rgb
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_http_fetch_and_redirect(http_server):
    base, expected = http_server
    for path in ("/img.png", "/redirect"):
        np.testing.assert_array_equal(np.asarray(load_image(base + path)), np.asarray(expected))


def test_http_errors(http_server):
    base, _ = http_server
    with pytest.raises(ImageError, match="HTTP 404"):
        load_image(base + "/missing.png")
    with pytest.raises(ImageError, match="over the limit of 100 bytes"):
        load_image(base + "/img.png", max_bytes=100)
    with pytest.raises(ImageError, match="could not fetch.*timed out"):
        load_image(base + "/slow", timeout=0.3)


def test_validate_url_sees_the_url_and_every_redirect_target(http_server):
    base, _ = http_server
    seen = []

    def only_redirect(url):
        seen.append(url)
        return url.endswith("/redirect")

    with pytest.raises(ImageError, match="refusing to fetch.*img.png"):
        load_image(base + "/redirect", validate_url=only_redirect)
    assert seen == [base + "/redirect", base + "/img.png"]

    def raises(url):
        raise PermissionError("private address")

    with pytest.raises(ImageError, match="refusing to fetch.*private address"):
        load_image(base + "/img.png", validate_url=raises)


# ---------------------------------------------------------------------------------------------
# Config parsing
# ---------------------------------------------------------------------------------------------


def test_from_dict_size_forms_unknown_keys_and_class_names():
    c = ImageProcessorConfig.from_dict({"size": 336, "crop_size": 336, "feature_extractor_type": "CLIPFeatureExtractor",
                                        "whatever": [1, 2]})
    assert (c.processor_class, c.shortest_edge, c.size, c.crop_size) == ("CLIPImageProcessor", 336, None, (336, 336))
    c = ImageProcessorConfig.from_dict({"image_processor_type": "SiglipImageProcessorFast",
                                        "size": {"height": 384, "width": 384}})
    assert (c.processor_class, c.size, c.shortest_edge, c.do_center_crop, c.image_mean) == (
        "SiglipImageProcessor", (384, 384), None, False, (0.5, 0.5, 0.5))
    c = ImageProcessorConfig.from_dict({"processor_class": "LlavaProcessor", "size": {"shortest_edge": 336},
                                        "crop_size": {"height": 336, "width": 336}, "do_pad": True})
    assert (c.processor_class, c.shortest_edge, c.do_pad) == ("LlavaImageProcessor", 336, True)
    c = ImageProcessorConfig.from_dict({"image_processor_type": "LlavaOnevisionImageProcessor", "image_mean": 0.5})
    assert c.is_anyres and c.size == (384, 384) and len(c.image_grid_pinpoints) == 36 and c.image_mean == (0.5,) * 3
    assert c.image_grid_pinpoints[0] == (384, 384) and c.image_grid_pinpoints[-1] == (2304, 2304)


def test_from_dict_bad_configs():
    with pytest.raises(ConfigError, match="unsupported image processor 'Qwen2VLImageProcessor'.*CLIPImageProcessor"):
        ImageProcessorConfig.from_dict({"image_processor_type": "Qwen2VLImageProcessor"})
    with pytest.raises(ConfigError, match="size"):
        ImageProcessorConfig.from_dict({"size": {"longest_edge": 10}})
    with pytest.raises(ConfigError, match="crop_size"):
        ImageProcessorConfig.from_dict({"crop_size": None})
    with pytest.raises(ConfigError, match="resample"):
        ImageProcessorConfig.from_dict({"resample": 9})
    with pytest.raises(ConfigError, match="non-zero std"):
        ImageProcessorConfig.from_dict({"image_std": [0.5, 0.0, 0.5]})


def test_shortest_edge_and_best_resolution_by_hand():
    assert shortest_edge_size(300, 451, 336) == (336, 505)  # int(336 * 451 / 300) = 505.12 -> 505
    assert shortest_edge_size(451, 300, 336) == (505, 336)
    grid = ImageProcessorConfig.llava_onevision().image_grid_pinpoints
    assert select_best_resolution((300, 451), grid) == (384, 768)  # 451x300 fits whole; least waste
    assert select_best_resolution((1, 1), grid) == (384, 384)
    assert select_best_resolution((2000, 500), grid) == (2304, 768)


# ---------------------------------------------------------------------------------------------
# Parity with the transformers PIL-backend processors (torchvision is not installed)
# ---------------------------------------------------------------------------------------------

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
ONEVISION_GRID = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
# preprocessor_config.json of the public checkpoints (as published on the hub).
REAL_CONFIGS = {
    "clip-vit-large-patch14-336": ("CLIPImageProcessorPil", {
        "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "resample": 3, "size": 336}),
    "siglip-so400m-patch14-384": ("SiglipImageProcessorPil", {
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5] * 3,
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5] * 3, "processor_class": "SiglipProcessor",
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": 384, "width": 384}}),
    "llava-1.5-pad": ("LlavaImageProcessorPil", {
        "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
        "image_processor_type": "LlavaImageProcessor", "image_std": CLIP_STD, "processor_class": "LlavaProcessor",
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336}}),
    "llava-onevision-qwen2-0.5b-ov-hf": ("LlavaOnevisionImageProcessorPil", {
        "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
        "image_grid_pinpoints": ONEVISION_GRID, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "image_processor_type": "LlavaOnevisionImageProcessor", "processor_class": "LlavaOnevisionProcessor",
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": 384, "width": 384}}),
    # Not a published file: exercises bilinear resampling, crop larger than the resized image
    # (zero padding), and CLIP with a fixed (height, width) resize.
    "clip-bilinear-oddcrop": ("CLIPImageProcessorPil", {
        "image_processor_type": "CLIPImageProcessor", "size": {"height": 200, "width": 150},
        "crop_size": {"height": 224, "width": 131}, "resample": 2}),
}


def _test_images() -> dict[str, Image.Image]:
    import skimage.data as data

    astronaut = data.astronaut()
    yy, xx = np.mgrid[0:512, 0:512]
    alpha = ((xx + yy) * 255 // 1022).astype(np.uint8)  # transparent corner to opaque corner
    rng = np.random.default_rng(7)
    smooth = lambda h, w: np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
        (w, h), Image.BICUBIC))  # noqa: E731
    chelsea = Image.fromarray(data.chelsea())
    palette_t = chelsea.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette_t.info["transparency"] = 0
    camera = data.camera()
    return {
        "astronaut": Image.fromarray(astronaut),
        "coffee": Image.fromarray(data.coffee()),
        "chelsea": chelsea,
        "rocket": Image.fromarray(data.rocket()),
        "camera_L": Image.fromarray(camera),
        "astronaut_RGBA": Image.fromarray(np.dstack([astronaut, alpha])),
        "logo_RGBA": Image.fromarray(data.logo()),
        "camera_LA": Image.fromarray(np.dstack([camera, alpha])),
        "chelsea_P": chelsea.convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
        "chelsea_P_transparency": palette_t,
        "coffee_CMYK": Image.fromarray(data.coffee()).convert("CMYK"),
        "wide_60x900": Image.fromarray(smooth(60, 900)),
        "tall_900x60": Image.fromarray(smooth(900, 60)),
        "tiny_1x1": Image.new("RGB", (1, 1), (200, 10, 90)),
        "tiny_2x3": Image.fromarray(rng.integers(0, 256, (2, 3, 3), dtype=np.uint8)),
    }


@pytest.fixture(scope="module")
def test_images():
    return _test_images()


@pytest.fixture(scope="module")
def hf_processors(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    out = {}
    for name, (cls_name, cfg) in REAL_CONFIGS.items():
        d = tmp_path_factory.mktemp(name)
        (d / "preprocessor_config.json").write_text(json.dumps(cfg))
        hf = getattr(transformers, cls_name).from_pretrained(str(d))
        assert hf.backend == "pil"
        out[name] = (hf, ImageProcessorConfig.from_dict(json.loads((d / "preprocessor_config.json").read_text())))
    return out


@pytest.mark.parametrize("config_name", list(REAL_CONFIGS))
def test_parity_with_transformers(config_name, test_images, hf_processors):
    hf, ours_cfg = hf_processors[config_name]
    for image_name, img in test_images.items():
        ref = hf(img.copy(), return_tensors="np")
        ours = preprocess(img.copy(), ours_cfg)
        ref_px = ref["pixel_values"][0]
        if ours_cfg.is_anyres:  # [batch, n_tiles, 3, H, W] and (height, width)
            assert tuple(int(v) for v in ref["image_sizes"][0]) == ours.image_size, image_name
        else:  # [batch, 3, H, W]
            ref_px = ref_px[None]
        assert ours.image_size == (img.height, img.width)
        assert tuple(ours.pixel_values.shape) == ref_px.shape, (config_name, image_name)
        assert ours.pixel_values.dtype == torch.float32
        diff = np.abs(ours.pixel_values.numpy() - ref_px).max()
        assert diff <= 1e-5, (config_name, image_name, diff)


def test_anyres_tiles_shape_and_content(test_images):
    cfg = ImageProcessorConfig.from_dict(REAL_CONFIGS["llava-onevision-qwen2-0.5b-ov-hf"][1])
    out = preprocess(test_images["chelsea"], cfg)  # 451 wide x 300 tall -> best (384, 768): 1 x 2 tiles
    assert tuple(out.pixel_values.shape) == (3, 3, 384, 384) and out.image_size == (300, 451)
    # Fitted into 384 x 768 by height: 384 tall, ceil(451 * 384/300) = 578 wide, centred with
    # (768 - 578) / 2 = 95 black columns each side; black normalizes to -1 with mean = std = 0.5.
    left, right = out.pixel_values[1], out.pixel_values[2]
    assert (left[:, :, :95] == -1).all() and not (left[:, :, 95] == -1).all()
    assert (right[:, :, 384 - 95 :] == -1).all() and not (right[:, :, 384 - 96] == -1).all()
    assert not (out.pixel_values[0] == -1).all(dim=(0, 1)).any()  # the whole-image view has no padding


def test_dtype_and_device_options(test_images):
    out = preprocess(test_images["tiny_2x3"], ImageProcessorConfig.siglip(64), dtype=torch.bfloat16, device="cpu")
    ref = preprocess(test_images["tiny_2x3"], ImageProcessorConfig.siglip(64))
    assert out.pixel_values.dtype == torch.bfloat16 and out.pixel_values.device.type == "cpu"
    torch.testing.assert_close(out.pixel_values.float(), ref.pixel_values, atol=1e-2, rtol=0)


def test_llava_pad_uses_truncated_mean_colour():
    # 2 tall x 8 wide black image: after expand-to-square the top/bottom bands are CLIP mean * 255, truncated.
    cfg = ImageProcessorConfig(processor_class="LlavaImageProcessor", shortest_edge=8, crop_size=(8, 8), do_pad=True,
                               do_normalize=False)
    px = preprocess(np.zeros((2, 8, 3), np.uint8), cfg).pixel_values[0]
    assert torch.allclose(px[:, 0, 0] * 255, torch.tensor([122.0, 116.0, 104.0]), atol=1e-4)
    assert torch.allclose(px[:, 4, 4], torch.zeros(3))


def test_preprocess_applies_no_pixel_limit_to_an_image_already_in_memory():
    big = Image.new("RGB", (9000, 8000), (0, 0, 0))  # 72 MP, over load_image's default limit
    with pytest.raises(ImageError, match="over the limit"):
        load_image(big)
    out = preprocess(big, ImageProcessorConfig.siglip(32))
    assert out.image_size == (8000, 9000) and tuple(out.pixel_values.shape) == (1, 3, 32, 32)
