"""Synthetic video tasks whose answers need the frames in order.

* direction: one dot crosses the frame left, right, up or down. Start points are drawn so that
  the frames of a "left" clip are, as a set, distributed like those of a "right" clip played
  backwards: a model that ignores frame order cannot beat chance on the left/right or up/down pair.
* first-shape: two different shapes appear one after the other and both stay; which came
  first is only visible from the order of the frames.

Clips are written with PyAV, cycling through MP4 (H.264), WebM (VP8) and AVI (MPEG-4).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlmkit.data.synthetic.render import _shape
from vlmkit.processing.video import write_video

DIRECTIONS = ("left", "right", "up", "down")
SHAPES = ("circle", "square", "triangle")
DIRECTION_QUESTION = "Which way does the dot move?"
FIRST_SHAPE_QUESTION = "Which shape appeared first?"
FORMATS = (".mp4", ".webm", ".avi")
INK = ((200, 30, 30), (30, 60, 210), (20, 140, 40), (20, 20, 20))


def _canvas(size: int, bg) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (size, size), bg)
    return img, ImageDraw.Draw(img)


def direction_clip(rng: random.Random, direction: str, size: int = 32, frames: int = 8) -> list[Image.Image]:
    r = max(2.0, size * 0.14)
    travel = size * 0.6
    lo, hi = r + 1, size - r - 1
    start = rng.uniform(lo, hi - travel)  # along the motion axis, for a positive direction
    across = rng.uniform(lo, hi)
    sign = 1 if direction in ("right", "down") else -1
    if sign < 0:
        start += travel
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    ink = rng.choice(INK)
    out = []
    for f in range(frames):
        along = start + sign * travel * f / (frames - 1)
        cx, cy = (along, across) if direction in ("left", "right") else (across, along)
        img, draw = _canvas(size, bg)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=ink)
        out.append(img)
    return out


def first_shape_clip(rng: random.Random, first: str, second: str, size: int = 32, frames: int = 8) -> list[Image.Image]:
    r = max(3.0, size * 0.17)
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    # Left/right halves at random, so where a shape stands says nothing about when it came.
    xs = [size * 0.27, size * 0.73]
    rng.shuffle(xs)
    ys = [rng.uniform(r + 1, size - r - 1) for _ in range(2)]
    appear = (frames // 4, frames // 2 + 1)
    out = []
    for f in range(frames):
        img, draw = _canvas(size, bg)
        for shape, x, y, t in ((first, xs[0], ys[0], appear[0]), (second, xs[1], ys[1], appear[1])):
            if f >= t:
                _shape(draw, shape, x, y, r, INK[3])
        out.append(img)
    return out


def make_video_item(rng: random.Random, task: str, size: int = 32, frames: int = 8) -> tuple[list[Image.Image], str, str]:
    """(frames, question, answer) for one clip of `task`."""
    if task == "direction":
        d = rng.choice(DIRECTIONS)
        return direction_clip(rng, d, size, frames), DIRECTION_QUESTION, d
    if task == "first-shape":
        first, second = rng.sample(SHAPES, 2)
        return first_shape_clip(rng, first, second, size, frames), FIRST_SHAPE_QUESTION, first
    raise ValueError(f"unknown video task {task!r}; known: direction, first-shape")


def video_records(out_dir: str | Path, n: int, split: str, seed: int, tasks=("direction",), size: int = 32,
                  frames: int = 8, fps: int = 8) -> list[dict]:
    """Write n clips under out_dir/videos and return LLaVA-style records (`video` + `<video>`)."""
    out = Path(out_dir)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        clip, question, answer = make_video_item(rng, task, size, frames)
        name = f"videos/{split}_{i:05d}_{task}{FORMATS[i % len(FORMATS)]}"
        write_video(out / name, [np.asarray(f) for f in clip], fps=fps)
        records.append({
            "id": f"{split}-video-{i}", "video": name, "task": task, "answer": answer,
            "conversations": [{"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}],
        })
    return records
