"""Pillow renderers for synthetic images whose ground truth is known exactly."""

from __future__ import annotations

import math
import random
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
WORDS = (
    "apple", "river", "cloud", "tiger", "piano", "lemon", "storm", "grape",
    "house", "train", "mouse", "light", "stone", "bread", "chair", "water",
)


@lru_cache(maxsize=8)
def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    """DejaVu from the system, else the copy matplotlib ships."""
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in ("/usr/share/fonts/truetype/dejavu",):
        if (Path(folder) / name).is_file():
            return ImageFont.truetype(str(Path(folder) / name), size)
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


def _shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(pts, fill=fill)


def scene(rng: random.Random, count: int, colour: str, shape: str, size: int = 224) -> Image.Image:
    """`count` non-overlapping shapes of one colour and kind on a light background."""
    bg = tuple(rng.randint(235, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = size * 0.11
    placed: list[tuple[float, float]] = []
    while len(placed) < count:
        cx, cy = rng.uniform(r + 4, size - r - 4), rng.uniform(r + 4, size - r - 4)
        if all((cx - x) ** 2 + (cy - y) ** 2 > (2.3 * r) ** 2 for x, y in placed):
            placed.append((cx, cy))
            _shape(draw, shape, cx, cy, r * rng.uniform(0.85, 1.0), COLOURS[colour])
    return img


def bar_chart(rng: random.Random, labels: list[str], values: list[int], size: int = 224) -> Image.Image:
    """A bar chart with a labelled y axis, gridlines and one labelled bar per category."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 30, size - 8, 10, size - 28
    vmax = 10
    small = font(12)
    for tick in range(0, vmax + 1, 2):
        y = bottom - (bottom - top) * tick / vmax
        draw.line((left, y, right, y), fill=(215, 215, 215))
        draw.text((left - 6, y), str(tick), fill="black", font=small, anchor="rm")
    draw.line((left, top, left, bottom), fill="black", width=1)
    draw.line((left, bottom, right, bottom), fill="black", width=1)
    slot = (right - left) / len(values)
    # A slight shade jitter keeps images distinct without making colour a nuisance to learn.
    shade = rng.randint(-20, 20)
    colour = (40 + shade, 90 + shade, 200 + shade // 2)
    for i, (label, value) in enumerate(zip(labels, values)):
        x0 = left + slot * i + slot * 0.2
        x1 = left + slot * (i + 1) - slot * 0.2
        y = bottom - (bottom - top) * value / vmax
        draw.rectangle((x0, y, x1, bottom), fill=colour)
        draw.text(((x0 + x1) / 2, bottom + 4), label, fill="black", font=font(14, bold=True), anchor="ma")
    return img


def word_image(rng: random.Random, word: str, size: int = 224) -> Image.Image:
    """One word in large dark letters near the centre of a light background."""
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 60) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    f = font(rng.randint(44, 50), bold=True)
    x0, y0, x1, y1 = draw.textbbox((0, 0), word, font=f)
    w, h = x1 - x0, y1 - y0
    x = (size - w) / 2 + rng.uniform(-12, 12) - x0
    y = (size - h) / 2 + rng.uniform(-30, 30) - y0
    draw.text((x, y), word, fill=ink, font=f)
    return img
