"""`vlmkit data synth-train DIR`: a small training set that exercises every preprocessing family.

Images come in many sizes and aspect ratios (from 1:4 to 4:1, 16 to 128 px a side), so tiling
families pick different grids, native-resolution families different patch counts, and a batch
always mixes sizes. The task is visual and cheap to learn: name the colour of an image (four
colours, noisy), or of the second of two images (multi-image samples: order matters), or of a
short video. A model that does not look scores at most the prior (the commonest colour).

Layout (LLaVA JSON, paths relative to DIR):
  train.json  single- and two-image samples        test.json  held-out questions with `task` / `answer`
  video.json  videos (4 frames)                    video_test.json
The test files are what `vlmkit eval run --benchmark synth-media --data DIR/test.json` scores.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image

from vlmkit.data.formats import write_llava_json
from vlmkit.processing.video import write_video

COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (220, 200, 40)}
IMAGE_QUESTION = "What colour is the image? Answer with one word."
SECOND_QUESTION = "What colour is the second image? Answer with one word."
VIDEO_QUESTION = "What colour is the video? Answer with one word."
SIDES = (16, 24, 32, 48, 64, 96, 128)


def colour_image(rng: random.Random, colour: str, width: int, height: int) -> Image.Image:
    """A noisy field of one colour, with a lighter blob so the image is not perfectly flat."""
    base = np.array(COLOURS[colour], dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 18, (height, width, 3))
    pixels = base + noise
    cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0.2, 0.5) * min(width, height)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 35
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _size(rng: random.Random) -> tuple[int, int]:
    w = rng.choice(SIDES)
    h = rng.choice([s for s in SIDES if max(w, s) / min(w, s) <= 4])
    return w, h


def _image_records(out: Path, n: int, split: str, rng: random.Random) -> list[dict]:
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        two = i % 4 == 3
        colours = [rng.choice(list(COLOURS)) for _ in range(2 if two else 1)]
        names = []
        for k, colour in enumerate(colours):
            name = f"images/{split}_{i:05d}_{k}.png"
            colour_image(rng, colour, *_size(rng)).save(out / name)
            names.append(name)
        question = ("<image>\n<image>\n" + SECOND_QUESTION) if two else ("<image>\n" + IMAGE_QUESTION)
        answer = colours[-1]
        records.append({
            "id": f"{split}-{i}", "image": names if two else names[0], "task": "second-image" if two else "image",
            "answer": answer,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        })
    return records


def _video_records(out: Path, n: int, split: str, rng: random.Random, frames: int = 4) -> list[dict]:
    records = []
    for i in range(n):
        colour = rng.choice(list(COLOURS))
        w, h = rng.choice(((32, 32), (48, 32), (32, 64), (64, 48)))
        name = f"videos/{split}_{i:05d}.mp4"
        write_video(out / name, [colour_image(rng, colour, w, h) for _ in range(frames)], fps=4)
        records.append({
            "id": f"{split}-video-{i}", "video": name, "task": "video", "answer": colour,
            "conversations": [{"from": "human", "value": "<video>\n" + VIDEO_QUESTION}, {"from": "gpt", "value": colour}],
        })
    return records


def write_family_dataset(out_dir: str | Path, n_train: int = 320, n_test: int = 48, n_video: int = 96,
                         seed: int = 0) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    splits = {
        "train": _image_records(out, n_train, "train", rng),
        "test": _image_records(out, n_test, "test", rng),
        "video": _video_records(out, n_video, "train", rng) if n_video else [],
        "video_test": _video_records(out, max(n_video // 6, 1), "test", rng) if n_video else [],
    }
    paths = {}
    for name, records in splits.items():
        if records:
            paths[name] = out / f"{name}.json"
            write_llava_json(paths[name], records)
    return paths
