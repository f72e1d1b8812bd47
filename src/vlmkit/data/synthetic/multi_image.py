"""Synthetic multi-image task: which of two images holds more objects?

Both images are drawn alike (same kind of dots, counts 1..5, at least 2 apart), so the answer
depends on telling the two token groups apart: swap the images and the answer flips. Records
use the OpenAI / TRL content-parts style, so that reader is exercised end to end; the data
module writes the video task in the LLaVA style, and a mixed file holds both.

`SyntheticMediaBench` scores either task through the evaluation harness (exact match after
normalisation, broken down by task).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from vlmkit.eval.benchmarks.base import Benchmark, BenchItem, EvalInputError, ScoreResult
from vlmkit.registry import BENCHMARKS
from vlmkit.processing.video import VideoInput

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


# ---- evaluation -------------------------------------------------------------------------------

@dataclass
class MediaItem(BenchItem):
    """A question over images and videos; `load_images` returns them in placeholder order
    (videos as `VideoInput`), which is what the vlmkit backend's processor takes."""

    media: list[tuple[str, Path]] = field(default_factory=list)

    def load_images(self):
        from vlmkit.processing.images import ImageLoadError, load_image

        out = []
        for kind, path in self.media:
            if kind == "video":
                out.append(VideoInput(path))
                continue
            try:
                out.append(load_image(path))
            except ImageLoadError as e:
                raise EvalInputError(f"item {self.id}: {e}") from None
        return out


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.strip().lower()).strip()


@BENCHMARKS.register("synth-media")
class SyntheticMediaBench(Benchmark):
    """The synthetic multi-image and video tasks, read from a vlmkit training-style JSON file."""

    name = "synth-media"
    metric = "exact match (lower-cased, punctuation dropped), per task"
    parser = "first word of the response"
    prompt_template = "<image> per visual input, then the record's question"
    default_max_new_tokens = 10  # byte-level tiny tokenizers spend one token per letter

    def load(self, data_dir) -> list[BenchItem]:
        from vlmkit.data.formats import record_to_sample

        path = Path(data_dir)
        path = path / "test.json" if path.is_dir() else path
        try:
            records = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EvalInputError(f"{path}: {e}") from None
        items = []
        for i, rec in enumerate(records):
            sample = record_to_sample(rec, i, path.parent, str(path))
            question = sample.messages[0].content
            kinds = [m.group(1) for m in re.finditer(r"<(image|video)>", question)]
            it_img, it_vid = iter(sample.images), iter(sample.videos)
            media = [(k, next(it_img) if k == "image" else next(it_vid)) for k in kinds]
            # The backend's convention is one `<image>` per visual input; the input decides how it expands.
            prompt = re.sub(r"<(image|video)>", "<image>", question)
            items.append(MediaItem(id=str(rec["id"]), question=prompt, images=[p for _, p in media],
                                   answers=[rec["answer"]], metadata={"task": rec.get("task", "")}, media=media))
        return items

    def prompt(self, item: BenchItem) -> str:
        return item.question

    def score(self, items: list[BenchItem], predictions: dict[str, str]) -> ScoreResult:
        per_item, by_task = {}, {}
        for it in items:
            pred = predictions.get(it.id)
            words = _norm(pred).split() if pred is not None else []
            ok = float(bool(words) and words[0] == _norm(it.answers[0]))
            per_item[it.id] = ok
            by_task.setdefault(it.metadata.get("task", ""), []).append(ok)
        overall = sum(per_item.values()) / len(items) if items else 0.0
        breakdown = {t: sum(v) / len(v) for t, v in sorted(by_task.items())}
        n_pred = sum(it.id in predictions for it in items)
        return ScoreResult(self.name, overall, f"{100 * overall:.1f}", breakdown, self.metric, self.parser,
                           len(items), n_pred, len(items) - n_pred, per_item=per_item)


def write_media_dataset(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0, video_tasks=("direction",),
                        size: int = 32, frames: int = 8) -> dict[str, Path]:
    """train.json / test.json mixing the multi-image task (content parts) and the video tasks (LLaVA)."""
    from vlmkit.data.formats import write_llava_json
    from vlmkit.data.synthetic.video import video_records

    out = Path(out_dir)
    paths = {}
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        half = n // 2
        records = multi_image_records(out, half, split, s, size) + video_records(out, n - half, split, s, video_tasks, size, frames)
        random.Random(s).shuffle(records)
        paths[split] = out / f"{split}.json"
        write_llava_json(paths[split], records)
    return paths
