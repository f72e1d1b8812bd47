"""`fidelity`: questions graded by how much visual detail they need, for token-budget sweeps.

Four image kinds, each question tagged with its `task` (the scoring rule), `kind` (what is asked)
and `difficulty` (the one knob that sets how fine the detail is):
- words: one word at a font size of 8, 12, 16, 24 or 32 px (DejaVu Sans Bold, the em size) on
  a 256 px image, anywhere on it; difficulty `8px` ... `32px`;
- charts: four bars with their values written above them and a labelled y axis whose scale
  varies; "what is the value of bar B" and "what is the top label of the y axis", with every
  label at 10, 14 or 20 px; difficulty `10px` ... `20px`;
- tables: a 3x3, 4x4 or 5x5 grid of numbers (the font shrinks with the cells); "what is in
  row R, column C"; difficulty `3x3` ... `5x5`;
- scenes: the quickstart's coloured shapes (count, colour, shape), the coarse control;
  difficulty `coarse`.
Images are drawn at 256 px, the quickstart processor's size, so a font size is what a model
sees at `image_size: 256` and scales with any other image size. Training questions (stage2.json)
ask every question about an image as one conversation, as the quickstart's do; a held-out image
never repeats a training image.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from vlmkit.data.formats import write_llava_json
from vlmkit.data.synthetic.render import WORDS, font
from vlmkit.data.synthetic.tasks import Question, _record, image_digest, make_scene
from vlmkit.registry import SYNTHETIC_DATA

SIZE = 256
WORD_SIZES = (8, 12, 16, 24, 32)
CHART_SIZES = (10, 14, 20)
TABLE_SIZES = (3, 4, 5)
BAR_LABELS = ("A", "B", "C", "D")
# The y axis's top value: the tick labels differ between charts, so reading one is reading.
CHART_SCALES = (8, 12, 20, 40, 60, 100)

# Question kind -> task (the scoring rule `synth-qa` applies): exact word or exact number.
FIDELITY_KIND_TASK = {"word": "fidelity-word", "bar-value": "fidelity-number", "tick": "fidelity-number",
                      "cell": "fidelity-number", "count": "scene", "colour": "scene", "shape": "scene"}
# (image kind, difficulty) in the order items cycle through, so every split is balanced.
DIFFICULTIES = (
    [("word", f"{s}px") for s in WORD_SIZES] + [("chart", f"{s}px") for s in CHART_SIZES]
    + [("table", f"{n}x{n}") for n in TABLE_SIZES] + [("scene", "coarse")]
)


def _light(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(230, 255) for _ in range(3))


def _dark(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(0, 60) for _ in range(3))


def word_at_size(rng: random.Random, word: str, size_px: int) -> Image.Image:
    """One word at `size_px` (the font's em size) at a random place on a light background."""
    img = Image.new("RGB", (SIZE, SIZE), _light(rng))
    draw = ImageDraw.Draw(img)
    f = font(size_px, bold=True)
    x0, y0, x1, y1 = draw.textbbox((0, 0), word, font=f)
    x = rng.uniform(4, SIZE - 4 - (x1 - x0)) - x0
    y = rng.uniform(4, SIZE - 4 - (y1 - y0)) - y0
    draw.text((x, y), word, fill=_dark(rng), font=f)
    return img


def labelled_bars(rng: random.Random, values: list[int], top: int, size_px: int) -> Image.Image:
    """Bars with their values written above them, a y axis labelled 0..`top` in four steps, every
    label at `size_px`."""
    img = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(img)
    f = font(size_px)
    left, right, upper, bottom = 8 + 2 * size_px, SIZE - 6, 10 + size_px, SIZE - 8 - size_px
    for k in range(5):
        tick = top * k // 4
        y = bottom - (bottom - upper) * k / 4
        draw.line((left, y, right, y), fill=(220, 220, 220))
        draw.text((left - 4, y), str(tick), fill="black", font=f, anchor="rm")
    draw.line((left, upper, left, bottom), fill="black")
    draw.line((left, bottom, right, bottom), fill="black")
    slot = (right - left) / len(values)
    shade = rng.randint(-20, 20)
    colour = (40 + shade, 90 + shade, 200 + shade // 2)
    for i, (label, value) in enumerate(zip(BAR_LABELS, values)):
        x0, x1 = left + slot * (i + 0.2), left + slot * (i + 0.8)
        y = bottom - (bottom - upper) * value / top
        draw.rectangle((x0, y, x1, bottom), fill=colour)
        draw.text(((x0 + x1) / 2, y - 2), str(value), fill="black", font=f, anchor="md")
        draw.text(((x0 + x1) / 2, bottom + 2), label, fill="black", font=f, anchor="ma")
    return img


def number_grid(rng: random.Random, cells: list[list[int]]) -> Image.Image:
    """A ruled table of numbers; the font fills about 40% of a cell's height."""
    n = len(cells)
    img = Image.new("RGB", (SIZE, SIZE), _light(rng))
    draw = ImageDraw.Draw(img)
    margin = 8
    step = (SIZE - 2 * margin) / n
    f = font(max(8, int(step * 0.4)))
    for k in range(n + 1):
        at = margin + k * step
        draw.line((margin, at, SIZE - margin, at), fill=(90, 90, 90))
        draw.line((at, margin, at, SIZE - margin), fill=(90, 90, 90))
    ink = _dark(rng)
    for r, row in enumerate(cells):
        for c, value in enumerate(row):
            draw.text((margin + (c + 0.5) * step, margin + (r + 0.5) * step), str(value), fill=ink, font=f, anchor="mm")
    return img


def _words(rng: random.Random, difficulty: str):
    word = rng.choice(WORDS)
    img = word_at_size(rng, word, int(difficulty[:-2]))
    return img, [Question("fidelity-word", "word", "What word is written in the image? Answer with the word.", word)]


def _chart(rng: random.Random, difficulty: str):
    top = rng.choice(CHART_SCALES)
    values = [rng.randint(1, top) for _ in BAR_LABELS]
    img = labelled_bars(rng, values, top, int(difficulty[:-2]))
    asked = rng.sample(range(len(BAR_LABELS)), 2)
    return img, [
        *(Question("fidelity-number", "bar-value", f"What is the value of bar {BAR_LABELS[i]}? Answer with a number.",
                   str(values[i])) for i in asked),
        Question("fidelity-number", "tick", "What is the highest number on the y axis? Answer with a number.", str(top)),
    ]


def _table(rng: random.Random, difficulty: str):
    n = int(difficulty.split("x")[0])
    cells = [[rng.randint(0, 99) for _ in range(n)] for _ in range(n)]
    img = number_grid(rng, cells)
    asked = rng.sample([(r, c) for r in range(n) for c in range(n)], 2)
    return img, [Question("fidelity-number", "cell", f"What number is in row {r + 1}, column {c + 1}? Answer with a number.",
                          str(cells[r][c])) for r, c in asked]


def _scene(rng: random.Random, difficulty: str):
    item = make_scene(rng)
    return item.image.resize((SIZE, SIZE), Image.BICUBIC), item.questions


MAKERS = {"word": _words, "chart": _chart, "table": _table, "scene": _scene}


def _held_out_question(questions: list[Question], i: int) -> Question:
    """The question a held-out image asks: cycled by index, so each kind of a chart (bar value,
    tick) and a scene (count, colour, shape) is asked equally often."""
    kinds = sorted({q.kind for q in questions})
    kind = kinds[(i // len(DIFFICULTIES)) % len(kinds)]
    return next(q for q in questions if q.kind == kind)


def generate_fidelity(out_dir: str | Path, n_train: int = 1200, n_test: int = 240, seed: int = 0) -> dict[str, Path]:
    """Write images/, stage2.json (every question of an image as one conversation) and test.json
    (one question per image, with `task`, `kind`, `difficulty` and `answer`)."""
    if n_train < 1 or n_test < 1:
        raise ValueError(f"fidelity data needs n_train and n_test of at least 1, not {n_train} and {n_test}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train, test, trained_on = [], [], set()
    with tqdm(total=n_train + n_test, desc="fidelity data", unit="img") as bar:
        for i in range(n_train):
            kind, difficulty = DIFFICULTIES[i % len(DIFFICULTIES)]
            img, questions = MAKERS[kind](rng, difficulty)
            trained_on.add(image_digest(img))
            name = f"images/train_{i:05d}_{kind}.png"
            img.save(out / name)
            turns = [(q.text, q.answer) for q in rng.sample(questions, len(questions))]
            train.append(_record(f"train-{i}", name, turns, task=kind, difficulty=difficulty))
            bar.update()
        for i in range(n_test):
            kind, difficulty = DIFFICULTIES[i % len(DIFFICULTIES)]
            img, questions = MAKERS[kind](rng, difficulty)
            # A drawn image can repeat a training one (a 3x3 table less likely than a scene);
            # a separate generator redraws it so the main one moves on as without the check.
            redraw = random.Random(f"{seed}-held-out-{i}")
            while image_digest(img) in trained_on:
                img, questions = MAKERS[kind](redraw, difficulty)
            name = f"images/test_{i:05d}_{kind}.png"
            img.save(out / name)
            q = _held_out_question(questions, i)
            test.append(_record(f"test-{i}", name, [(q.text, q.answer)], task=q.task, kind=q.kind,
                                difficulty=difficulty, answer=q.answer))
            bar.update()
    paths = {"stage2": out / "stage2.json", "test": out / "test.json"}
    write_llava_json(paths["stage2"], train)
    write_llava_json(paths["test"], test)
    return paths


FIDELITY_SIZES = {"n_train": 1200, "n_test": 240}


@SYNTHETIC_DATA.register("fidelity")
def fidelity_data(out_dir: str | Path, *, seed: int = 0, **sizes) -> dict[str, Path]:
    """Words at five font sizes, labelled bar charts, number tables and scenes, each held-out
    question tagged with its difficulty."""
    unknown = sorted(set(sizes) - set(FIDELITY_SIZES))
    if unknown:
        raise ValueError(f"fidelity data takes {sorted(FIDELITY_SIZES)}, not {unknown}")
    return generate_fidelity(out_dir, seed=seed, **{**FIDELITY_SIZES, **{k: int(v) for k, v in sizes.items()}})
