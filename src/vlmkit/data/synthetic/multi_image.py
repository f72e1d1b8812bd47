"""Synthetic multi-image task: which of two images holds more objects?

Both images are drawn alike (same kind of dots, counts 1..5, at least 2 apart), so the answer
depends on telling the two token groups apart: swap the images and the answer flips. Records
use the OpenAI / TRL content-parts style, so that reader is exercised end to end; the data
module writes the video task in the LLaVA style, and a mixed file holds both.

The `synth-media` benchmark (`vlmkit.eval.benchmarks.synth_media`) scores either task through the
evaluation harness.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from vlmkit.data.formats import write_llava_json
from vlmkit.data.synthetic.video import video_records

MORE_QUESTION = "Which image holds more objects? Answer first or second."
PAIRS = tuple((a, b) for a in range(1, 6) for b in range(a + 2, 6))
INK = ((200, 30, 30), (30, 60, 210), (20, 140, 40), (20, 20, 20))


def objects_image(rng: random.Random, count: int, size: int = 32) -> Image.Image:
    """`count` non-overlapping dots on a light background."""
    bg = tuple(rng.randint(230, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = max(2.0, size * 0.08)
    placed: list[tuple[float, float]] = []
    while len(placed) < count:
        x, y = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)
        if all((x - a) ** 2 + (y - b) ** 2 > (2.4 * r) ** 2 for a, b in placed):
            placed.append((x, y))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=rng.choice(INK))
    return img


def multi_image_records(out_dir: str | Path, n: int, split: str, seed: int, size: int = 32) -> list[dict]:
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        # Counts at least 2 apart: the task is about telling the two images apart, not fine counting.
        a, b = rng.choice(PAIRS)
        if rng.random() < 0.5:
            a, b = b, a
        names = []
        for k, count in enumerate((a, b)):
            name = f"images/{split}_{i:05d}_{k}.png"
            objects_image(rng, count, size).save(out / name)
            names.append(name)
        answer = "first" if a > b else "second"
        records.append({
            "id": f"{split}-pair-{i}", "task": "more-objects", "answer": answer, "counts": [a, b],
            "messages": [
                {"role": "user", "content": [
                    {"type": "image", "image": names[0]}, {"type": "image", "image": names[1]},
                    {"type": "text", "text": MORE_QUESTION},
                ]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
        })
    return records


def write_media_dataset(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0, video_tasks=("direction",),
                        size: int = 32, frames: int = 8) -> dict[str, Path]:
    """train.json / test.json mixing the multi-image task (content parts) and the video tasks (LLaVA)."""
    out = Path(out_dir)
    paths = {}
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        half = n // 2
        records = multi_image_records(out, half, split, s, size) + video_records(out, n - half, split, s, video_tasks, size, frames)
        random.Random(s).shuffle(records)
        paths[split] = out / f"{split}.json"
        write_llava_json(paths[split], records)
    return paths
