"""Drawing the synthetic scenes with PIL: backgrounds, shapes, one word or number, bar charts.

Every function that makes a choice takes the scene's own ``random.Random``, so a scene is a pure
function of its (seed, index). Sizes are fractions of the image's short side ``S`` because the
vision tower squashes every image to 168x168: an object's diameter is at least 15% of ``S`` and a
word's cap height at least 18% of the image height, so both stay a few 14-px patches big.

Colours are named RGB values jittered a little per object; an object's colour never shares the
background's colour family and is at least ``MIN_CONTRAST`` (Euclidean RGB) away from every
background colour, so "what colour is it" always has one clear answer.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (245, 215, 30),
    "orange": (245, 130, 20), "purple": (130, 50, 180), "pink": (245, 120, 190), "brown": (130, 80, 35),
    "black": (15, 15, 15), "white": (250, 250, 250), "gray": (128, 128, 128),
}
# Backgrounds: the last word of a name is its colour family (excluded for objects drawn on it).
LIGHT_BACKGROUNDS = {
    "white": (246, 246, 246), "light gray": (214, 214, 214), "light blue": (200, 222, 246),
    "light green": (204, 236, 200), "light pink": (246, 212, 222), "light yellow": (250, 244, 192),
}
DARK_BACKGROUNDS = {
    "black": (18, 18, 18), "dark gray": (62, 62, 62), "dark blue": (22, 32, 86),
    "dark green": (22, 64, 34), "dark purple": (56, 24, 66),
}
MIN_CONTRAST = 100.0   # RGB distance between an object and every background colour
JITTER = 12            # per-channel jitter of an object's colour
SMALL_R = (0.075, 0.10)   # radius / short side: diameter 15-20% of the short side
LARGE_R = (0.13, 0.17)    # diameter 26-34%
HULL = 1.12            # every shape fits in a circle of HULL * r (the square's corners reach 1.10 r)


@dataclass
class Background:
    kind: str                      # "plain", "gradient" or "noise"
    names: tuple[str, ...]         # one name, or two for a gradient
    rgbs: tuple[tuple[int, int, int], ...]
    direction: str = ""            # "vertical" or "horizontal" for gradients

    @property
    def families(self) -> set[str]:
        return {n.split()[-1] for n in self.names}

    @property
    def is_dark(self) -> bool:
        return self.names[0] in DARK_BACKGROUNDS

    def describe(self) -> str:
        """Noun phrase for captions, e.g. 'a light green background'."""
        if self.kind == "gradient":
            return f"a {self.names[0]} to {self.names[1]} gradient background"
        if self.kind == "noise":
            return f"a grainy {self.names[0]} background"
        return f"a {self.names[0]} background"


@dataclass
class Obj:
    shape: str
    colour: str
    size: str                      # "small" or "large"
    cx: float
    cy: float
    r: float
    rgb: tuple[int, int, int]

    @property
    def description(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class TextItem:
    text: str                      # as drawn (may be UPPER or Capitalised)
    answer: str                    # lowercase word or digits
    is_number: bool
    colour: str
    rgb: tuple[int, int, int]
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 of the drawn pixels
    cap_height: int


@dataclass
class Bar:
    label: str
    colour: str
    rgb: tuple[int, int, int]
    x0: int
    x1: int
    top: int
    bottom: int                    # the axis line's y; the bar covers rows top..bottom-1

    @property
    def height(self) -> int:
        return self.bottom - self.top


# --- image size and background ------------------------------------------------------------------------

def sample_size(rng: random.Random) -> tuple[int, int]:
    """(width, height) in 160..320 with width / height in [0.75, 1.33]."""
    while True:
        w, h = rng.randint(160, 320), rng.randint(160, 320)
        if 0.75 <= w / h <= 1.33:
            return w, h


def sample_background(rng: random.Random) -> Background:
    table = LIGHT_BACKGROUNDS if rng.random() < 0.6 else DARK_BACKGROUNDS
    u = rng.random()
    if u < 0.5:
        name = rng.choice(sorted(table))
        return Background("plain", (name,), (table[name],))
    if u < 0.8:
        a, b = rng.sample(sorted(table), 2)
        return Background("gradient", (a, b), (table[a], table[b]), rng.choice(("vertical", "horizontal")))
    name = rng.choice(sorted(table))
    return Background("noise", (name,), (table[name],))


def background_image(bg: Background, w: int, h: int, rng: random.Random) -> Image.Image:
    if bg.kind == "plain":
        return Image.new("RGB", (w, h), bg.rgbs[0])
    c0, c1 = (np.array(c, dtype=np.float32) for c in (bg.rgbs + bg.rgbs)[:2])
    if bg.kind == "gradient":
        t = np.linspace(0.0, 1.0, h if bg.direction == "vertical" else w, dtype=np.float32)
        t = t[:, None, None] if bg.direction == "vertical" else t[None, :, None]
        arr = np.broadcast_to(c0 * (1 - t) + c1 * t, (h, w, 3))
    else:  # light grain: one gray-level noise per pixel, so the hue stays the background's
        noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, 9.0, (h, w, 1)).astype(np.float32)
        arr = c0 + noise
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGB")


def contrasting_colours(bg: Background, exclude: set[str] = frozenset()) -> list[str]:
    """Colour names that are not the background's family and far enough from all its colours."""
    out = []
    for name, rgb in COLOURS.items():
        if name in bg.families or name in exclude:
            continue
        if min(math.dist(rgb, b) for b in bg.rgbs) >= MIN_CONTRAST + JITTER * 1.8:
            out.append(name)
    return out


def jitter(rng: random.Random, name: str) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-JITTER, JITTER))) for c in COLOURS[name])


# --- shapes -------------------------------------------------------------------------------------------

def _ring(cx, cy, radii, n, start_deg):
    return [(cx + radii[i % len(radii)] * math.cos(math.radians(start_deg + 360 * i / n)),
             cy + radii[i % len(radii)] * math.sin(math.radians(start_deg + 360 * i / n))) for i in range(n)]


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred at (cx, cy) with circumradius about ``r`` (not for circles)."""
    if shape == "square":
        s = 0.78 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":   # pointing up, centroid at the centre
        return _ring(cx, cy + 0.1 * r, [1.1 * r], 3, -90)
    if shape == "star":
        return _ring(cx, cy + 0.05 * r, [1.08 * r, 0.45 * r], 10, -90)
    if shape == "hexagon":
        return _ring(cx, cy, [r], 6, 0)
    if shape == "diamond":    # a rhombus narrower than tall, so it is not a turned square
        return [(cx, cy - 1.08 * r), (cx + 0.68 * r, cy), (cx, cy + 1.08 * r), (cx - 0.68 * r, cy)]
    raise ValueError(f"unknown shape {shape!r}")


def draw_object(draw: ImageDraw.ImageDraw, o: Obj) -> None:
    if o.shape == "circle":
        draw.ellipse((o.cx - o.r, o.cy - o.r, o.cx + o.r, o.cy + o.r), fill=o.rgb)
    else:
        draw.polygon(shape_polygon(o.shape, o.cx, o.cy, o.r), fill=o.rgb)


def _radius(rng: random.Random, size: str, short: int) -> float:
    lo, hi = SMALL_R if size == "small" else LARGE_R
    return rng.uniform(lo, hi) * short


def place_objects(rng: random.Random, w: int, h: int, specs: list[tuple[str, str]], bg: Background,
                  keep_out: tuple[int, int, int, int] | None = None, sizes: tuple[str, ...] = ("small", "large"),
                  ) -> list[Obj] | None:
    """Place (shape, colour) specs without overlaps by rejection sampling; None if they do not fit.

    Large objects that do not fit become small before the whole layout is given up.
    ``keep_out`` is a rectangle (a drawn word) that no object may touch.
    """
    short = min(w, h)
    margin, gap = 0.04 * short, 0.03 * short
    for _attempt in range(30):
        placed: list[Obj] = []
        for shape, colour in specs:
            size = rng.choice(sizes)
            for _ in range(60):
                if _ == 30:
                    size = "small"
                r = _radius(rng, size, short)
                hull = HULL * r
                if w - 2 * (hull + margin) <= 0 or h - 2 * (hull + margin) <= 0:
                    continue
                cx = rng.uniform(hull + margin, w - hull - margin)
                cy = rng.uniform(hull + margin, h - hull - margin)
                if any(math.dist((cx, cy), (o.cx, o.cy)) < hull + HULL * o.r + gap for o in placed):
                    continue
                if keep_out is not None and _circle_hits_rect(cx, cy, hull + gap, keep_out):
                    continue
                placed.append(Obj(shape, colour, size, cx, cy, r, jitter(rng, colour)))
                break
            else:
                break
        if len(placed) == len(specs):
            return placed
    return None


def _circle_hits_rect(cx, cy, radius, rect) -> bool:
    x0, y0, x1, y1 = rect
    nx, ny = min(max(cx, x0), x1), min(max(cy, y0), y1)
    return math.dist((cx, cy), (nx, ny)) < radius


# --- text ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _font(size: int):
    return ImageFont.load_default(size=size)


def _stroke(size: int) -> int:
    return max(1, size // 28)   # Aileron Regular is thin; a same-colour stroke keeps it legible at 168 px


def text_mask(text: str, size: int) -> Image.Image:
    """An "L" mask (255 = ink) of ``text`` cropped to its ink, about ``size`` px font size.

    Pillow >= 10.1 ships a TrueType default font; without FreeType the fixed bitmap font is
    drawn and scaled up with nearest-neighbour resampling to the same cap height.
    """
    font = _font(size)
    if isinstance(font, ImageFont.FreeTypeFont):
        sw = _stroke(size)
        l, t, r, b = font.getbbox(text, stroke_width=sw)
        mask = Image.new("L", (r - l, b - t), 0)
        ImageDraw.Draw(mask).text((-l, -t), text, font=font, fill=255, stroke_width=sw, stroke_fill=255)
        return mask
    l, t, r, b = font.getbbox(text)
    small = Image.new("L", (r - l, b - t), 0)
    ImageDraw.Draw(small).text((-l, -t), text, font=font, fill=255)
    cap = max(1, font.getbbox("H")[3] - font.getbbox("H")[1])
    k = max(1, round(0.7 * size / cap))
    return small.resize((small.width * k, small.height * k), Image.NEAREST)


@lru_cache(maxsize=None)
def cap_ratio() -> float:
    """Cap height of the default font divided by its size."""
    return text_mask("H", 100).height / 100


def draw_text(img: Image.Image, rng: random.Random, text: str, answer: str, is_number: bool, colour: str,
              cap_frac: float) -> TextItem | None:
    """Draw ``text`` with cap height ``cap_frac`` of the image height at a random place; None if too wide."""
    w, h = img.size
    size = max(8, round(cap_frac * h / cap_ratio()))
    mask = text_mask(text, size)
    if mask.width > 0.9 * w:
        size = int(size * 0.88 * w / mask.width)
        mask = text_mask(text, size)
    cap = text_mask("H", size).height
    if cap < 0.18 * h or mask.width > 0.9 * w or mask.height > 0.8 * h:
        return None
    margin = int(0.04 * min(w, h))
    x = rng.randint(margin, max(margin, w - margin - mask.width))
    y = rng.randint(margin, max(margin, h - margin - mask.height))
    rgb = jitter(rng, colour)
    img.paste(rgb, (x, y, x + mask.width, y + mask.height), mask)
    return TextItem(text, answer, is_number, colour, rgb, (x, y, x + mask.width, y + mask.height), cap)


# --- bar charts ---------------------------------------------------------------------------------------

def bar_fractions(rng: random.Random, n: int) -> list[float]:
    """``n`` heights in (0, 1] whose pairwise differences are all >= 15% of the largest."""
    while True:
        v = [rng.uniform(0.15, 1.0) for _ in range(n)]
        top = max(v)
        if all(abs(a - b) >= 0.15 * top for i, a in enumerate(v) for b in v[i + 1:]) and top >= 0.6:
            return v


def draw_chart(img: Image.Image, rng: random.Random, bg: Background, n: int, colours: list[str]) -> list[Bar]:
    """Vertical bars labelled A.. above an axis line; ``colours`` holds one colour or one per bar."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    axis_rgb = (20, 20, 20) if not bg.is_dark else (235, 235, 235)
    line = max(2, min(w, h) // 80)
    left, right = int(w * rng.uniform(0.08, 0.14)), int(w * (1 - rng.uniform(0.05, 0.1)))
    top, base = int(h * rng.uniform(0.06, 0.12)), int(h * rng.uniform(0.78, 0.84))
    draw.line((left, base, right, base), fill=axis_rgb, width=line)            # x axis
    draw.line((left, top, left, base + line // 2), fill=axis_rgb, width=line)  # y axis
    slot = (right - left - line) / n
    fill = rng.uniform(0.5, 0.72)
    label_size = max(10, round(0.09 * h / cap_ratio()))
    bars = []
    for i, frac in enumerate(bar_fractions(rng, n)):
        cx = left + line + slot * (i + 0.5)
        x0, x1 = round(cx - slot * fill / 2), round(cx + slot * fill / 2)
        bar_top = base - line // 2 - max(4, round(frac * (base - top)))
        colour = colours[i % len(colours)]
        rgb = jitter(rng, colour) if len(colours) > 1 or not bars else bars[0].rgb
        draw.rectangle((x0, bar_top, x1 - 1, base - line // 2 - 1), fill=rgb)
        label = "ABCDE"[i]
        mask = text_mask(label, label_size)
        lx, ly = round(cx - mask.width / 2), base + line + max(3, round(0.03 * h))
        img.paste(axis_rgb, (lx, ly, lx + mask.width, ly + mask.height), mask)
        bars.append(Bar(label, colour, rgb, x0, x1, bar_top, base - line // 2))
    return bars
