"""The built-in synthetic dataset: captions for stage 1, questions for stage 2, a held-out test split.

Every answer is known exactly because we drew the image. Three task families:
- scene: coloured shapes; captions, "how many", "what colour", "what shape".
- chart: bar charts; "what is the value of bar B" (scored with ChartQA's relaxed accuracy).
- text: one rendered word; "what is written" (scored with OCRBench's matching rule).
All splits are written in the LLaVA JSON format; stage-2 records ask every question about their
image as one multi-turn conversation; test records ask one question and carry `task` and `answer`.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from vlmkit.data.formats import write_llava_json
from vlmkit.data.synthetic.render import COLOURS, SHAPES, WORDS, bar_chart, scene, word_image
from vlmkit.registry import SYNTHETIC_DATA

BAR_LABELS = ("A", "B", "C")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


# Question kinds, each with the task (and so the official scoring rule) it belongs to.
KIND_TASK = {"word": "text", "bar": "chart", "count": "scene", "colour": "scene", "shape": "scene"}
KINDS = tuple(KIND_TASK)


@dataclass
class Question:
    task: str  # chart | text | scene: picks the official scoring rule
    kind: str  # what is asked: word | bar | count | colour | shape
    text: str
    answer: str


@dataclass
class Item:
    image: object  # PIL image
    caption: str
    questions: list[Question]


def question_kind(record: dict) -> str:
    """The kind of a test record's question (`kind`, or told from its text in data written before
    records carried it)."""
    if "kind" in record:
        return record["kind"]
    question = record["conversations"][0]["value"]
    if record.get("task") == "text":
        return "word"
    if record.get("task") == "chart":
        return "bar"
    return "count" if "How many" in question else "colour" if "colour" in question else "shape"


def make_scene(rng: random.Random) -> Item:
    count, colour, shape = rng.randint(1, 4), rng.choice(list(COLOURS)), rng.choice(SHAPES)
    img = scene(rng, count, colour, shape)
    noun = shape if count == 1 else shape + "s"
    caption = f"{NUMBER_WORDS[count].capitalize()} {colour} {noun} on a light background."
    return Item(img, caption, [
        Question("scene", "count", "How many shapes are in the image? Answer with a number.", str(count)),
        Question("scene", "colour", "What colour are the shapes? Answer with one word.", colour),
        Question("scene", "shape", "What kind of shape is shown? Answer with one word.", shape),
    ])


def make_chart(rng: random.Random) -> Item:
    values = [rng.randint(1, 9) for _ in BAR_LABELS]
    img = bar_chart(rng, list(BAR_LABELS), values)
    caption = "A bar chart with bars " + ", ".join(f"{l} at {v}" for l, v in zip(BAR_LABELS, values)) + "."
    return Item(img, caption, [
        Question("chart", "bar", f"What is the value of bar {label}? Answer with a number.", str(value))
        for label, value in zip(BAR_LABELS, values)
    ])


def make_text(rng: random.Random) -> Item:
    word = rng.choice(WORDS)
    img = word_image(rng, word)
    return Item(img, f'The word "{word}" written in dark letters.', [
        Question("text", "word", "What word is written in the image? Answer with the word.", word),
    ])


MAKERS = {"scene": make_scene, "chart": make_chart, "text": make_text}


def _record(rid: str, image: str, turns: list[tuple[str, str]], **extra) -> dict:
    """A LLaVA record; the image placeholder goes in the first question only."""
    conversations = []
    for k, (question, reply) in enumerate(turns):
        conversations.append({"from": "human", "value": f"<image>\n{question}" if k == 0 else question})
        conversations.append({"from": "gpt", "value": reply})
    return {"id": rid, "image": image, "conversations": conversations, **extra}


def image_digest(image) -> str:
    """Digest of an image's pixels (what a model sees; file bytes can differ for equal pixels)."""
    return hashlib.blake2b(image.tobytes() + repr((image.mode, image.size)).encode(), digest_size=16).hexdigest()


def generate(out_dir: str | Path, n_caption: int = 300, n_instruct: int = 900, n_test: int = 150, seed: int = 0,
             n_instruct_more: int = 0, n_caption_more: int = 0, more_kinds: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Write images/ and stage1.json (captions), stage2.json (QA), test.json (held-out QA).

    A held-out image is never one the training splits hold: a chart is fully determined by its
    three values and shade, so a test draw can repeat a training chart pixel for pixel; such a
    draw is replaced by a fresh one from a separate generator (the main one moves on as before,
    so every other item is the same as without the check).

    `n_instruct_more` adds stage-2 images drawn after the held-out split, from their own
    generator, so the held-out questions stay those of `n_caption` + `n_instruct` + `n_test`
    alone; none of them repeats a held-out image either. `n_caption_more` does the same for
    stage-1 captions, from a third generator. `more_kinds` is the cycle of image kinds those extra
    images follow (default: scene, chart, text in turn), so a recipe can give a hard kind more
    examples without touching the held-out split."""
    kinds = list(MAKERS)
    more_cycle = list(more_kinds or kinds)
    unknown = sorted(set(more_cycle) - set(MAKERS))
    if unknown:
        raise ValueError(f"more_kinds names {unknown}; the kinds are {sorted(MAKERS)}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"stage1": [], "stage2": [], "test": []}
    plan = [("stage1", n_caption), ("stage2", n_instruct), ("test", n_test)]
    total = sum(n for _, n in plan)
    trained_on: set[str] = set()
    with tqdm(total=total, desc="synthetic data", unit="img") as bar:
        for split, n in plan:
            for i in range(n):
                kind = kinds[i % len(kinds)]
                item = MAKERS[kind](rng)
                if split == "test":
                    redraw = random.Random(f"{seed}-held-out-{i}")
                    while image_digest(item.image) in trained_on:
                        item = MAKERS[kind](redraw)
                else:
                    trained_on.add(image_digest(item.image))
                name = f"images/{split}_{i:05d}_{kind}.png"
                item.image.save(out / name)
                if split == "stage1":
                    splits[split].append(_record(f"{split}-{i}", name, [("Describe the image briefly.", item.caption)]))
                elif split == "stage2":
                    # Every question about the image, in random order, as one multi-turn
                    # conversation: one image forward pass supervises several answers.
                    turns = [(q.text, q.answer) for q in rng.sample(item.questions, len(item.questions))]
                    splits[split].append(_record(f"{split}-{i}", name, turns, task=kind))
                else:
                    q = item.questions[rng.randrange(len(item.questions))]
                    splits[split].append(_record(f"{split}-{i}", name, [(q.text, q.answer)], task=q.task, kind=q.kind, answer=q.answer))
                bar.update()
    held_out = {image_digest(Image.open(out / r["image"]).convert("RGB")) for r in splits["test"]}
    for split, n in (("stage2", n_instruct_more), ("stage1", n_caption_more)):
        more = random.Random(f"{seed}-more-{'instruct' if split == 'stage2' else 'captions'}")
        for i in tqdm(range(n), desc=f"more {split} data", unit="img", disable=not n):
            kind = more_cycle[i % len(more_cycle)]
            item = MAKERS[kind](more)
            while image_digest(item.image) in held_out:
                item = MAKERS[kind](more)
            name = f"images/{split}more_{i:05d}_{kind}.png"
            item.image.save(out / name)
            if split == "stage1":
                splits[split].append(_record(f"{split}more-{i}", name, [("Describe the image briefly.", item.caption)]))
            else:
                turns = [(q.text, q.answer) for q in more.sample(item.questions, len(item.questions))]
                splits[split].append(_record(f"{split}more-{i}", name, turns, task=kind))
    paths = {}
    for split, records in splits.items():
        paths[split] = out / f"{split}.json"
        write_llava_json(paths[split], records)
    return paths


# The quickstart's data: more stage-2 images than steps can repeat (a connector that sees each
# image a few times memorises it instead of learning to read), half of the further ones charts,
# the hardest kind to learn.
QUICKSTART_SIZES = {"n_caption": 400, "n_instruct": 600, "n_test": 150, "n_instruct_more": 1400,
                    "more_kinds": ("chart", "text", "chart", "scene")}


@SYNTHETIC_DATA.register("quickstart")
def quickstart_data(out_dir: str | Path, *, seed: int = 0, **sizes) -> dict[str, Path]:
    """Scenes (colour, shape, count), bar charts (bar values) and words, as the quickstart trains on."""
    unknown = sorted(set(sizes) - set(QUICKSTART_SIZES))
    if unknown:
        raise ValueError(f"quickstart data takes {sorted(QUICKSTART_SIZES)}, not {unknown}")
    return generate(out_dir, seed=seed, **{**QUICKSTART_SIZES, **sizes})


def write_question_records(data_dir: str | Path, task: str = "chart", name: str | None = None) -> Path:
    """One single-question record per question of `task`'s stage-2 conversations (each asked
    with its image, as the held-out split asks), written as `<task>.json` next to stage2.json:
    a GRPO stage's prompts, each record's answer its reference."""
    folder = Path(data_dir)
    with open(folder / "stage2.json", encoding="utf-8") as f:
        records = json.load(f)
    out = []
    for r in records:
        if r.get("task") != task:
            continue
        turns = r["conversations"]
        for k in range(0, len(turns) - 1, 2):
            question = turns[k]["value"].replace("<image>\n", "")
            out.append(_record(f"{r['id']}-q{k // 2}", r["image"], [(question, turns[k + 1]["value"])], task=task))
    if not out:
        raise ValueError(f"{folder / 'stage2.json'}: no records of task {task!r}")
    path = folder / (name or f"{task}.json")
    write_llava_json(path, out)
    return path
