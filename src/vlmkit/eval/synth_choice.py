"""Synthetic copies of the multiple-choice benchmarks in their official layouts: MMBench's TSV
(base64 images, circular passes at index g + k * 1,000,000), MMStar's parquet and MMMU-Pro's
parquet folders. Each question asks which word an image shows; the gold letter is known."""

from __future__ import annotations

import base64
import io
import random
from pathlib import Path
from typing import Any

from PIL import Image

from vlmkit.eval.benchmarks.base import EvalInputError

WORDS = ["CENTRE", "FRIEND", "OCEAN", "MARKET", "GARDEN", "PLANET", "SILVER", "RIVER", "WINTER", "BRIDGE",
         "CASTLE", "FOREST", "ORANGE", "TICKET", "SUMMER", "PENCIL"]
MMBENCH_CATEGORIES = [  # (leaf category, L2 ability) pairs of the real release
    ("ocr", "finegrained_perception (instance-level)"),
    ("image_scene", "coarse_perception"),
    ("spatial_relationship", "relation_reasoning"),
    ("future_prediction", "logic_reasoning"),
]
MMSTAR_CATEGORIES = [
    ("coarse perception", "image scene and topic"),
    ("fine-grained perception", "recognition"),
    ("instance reasoning", "single-instance reasoning"),
    ("logical reasoning", "diagram reasoning"),
    ("science & technology", "biology & chemistry & physics"),
    ("math", "numeric commonsense and calculation"),
]
SUBJECTS = ["Art", "Accounting", "History", "Math", "Pharmacy", "Computer_Science"]

Gold = list[tuple[Any, str]]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _word_question(rng: random.Random, k: int) -> tuple[str, list[str], int]:
    """(shown word, k options, index of the right one)."""
    opts = rng.sample(WORDS, k)
    right = rng.randrange(k)
    return opts[right], opts, right


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise EvalInputError("writing parquet files needs pyarrow (pip install pyarrow)") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def synth_mmbench(root: Path, n: int, rng: random.Random) -> tuple[Gold, int]:
    """`MMBench_DEV_EN.tsv`: each question with 2 to 4 options, then one row per further rotation
    (its image cell names the first row, as in the release)."""
    import pandas as pd

    from vlmkit.eval.synth import text_image

    rows, gold = [], []
    for g in range(n):
        k = (4, 3, 2, 4)[g % 4]
        word, opts, _right = _word_question(rng, k)
        cat, l2 = MMBENCH_CATEGORIES[g % len(MMBENCH_CATEGORIES)]
        image = base64.b64encode(_png(text_image(word))).decode()
        for r in range(k):
            rot = opts[r:] + opts[:r]
            letter = "ABCD"[rot.index(word)]
            index = g + r * 1_000_000
            cells = {c: (rot[i] if i < k else None) for i, c in enumerate("ABCD")}
            rows.append({"index": index, "question": "Which word is written in the image?",
                         "hint": "The image shows one word." if g % 2 else None, **cells, "answer": letter,
                         "category": cat, "image": image if r == 0 else str(g), "source": "vlmkit-synth",
                         "l2-category": l2, "comment": None, "split": "dev"})
            gold.append((index, letter))
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "MMBench_DEV_EN.tsv", sep="\t", index=False)
    return gold, n


def synth_mmstar(root: Path, n: int, rng: random.Random) -> tuple[Gold, int]:
    from vlmkit.eval.synth import text_image

    rows, gold = [], []
    for i in range(n):
        word, opts, right = _word_question(rng, 4)
        cat, l2 = MMSTAR_CATEGORIES[i % len(MMSTAR_CATEGORIES)]
        options = ", ".join(f"{c}: {o}" for c, o in zip("ABCD", opts))
        letter = "ABCD"[right]
        rows.append({"index": i, "question": f"Which word is written in the image?\nOptions: {options}",
                     "image": {"bytes": _png(text_image(word)), "path": None}, "answer": letter, "category": cat,
                     "l2_category": l2, "meta_info": {"source": "vlmkit-synth", "split": "val", "image_path": None}})
        gold.append((i, letter))
    _write_parquet(root / "mmstar.parquet", rows)
    return gold, n


def _mmmu_pro(root: Path, n: int, rng: random.Random, vision: bool) -> tuple[Gold, int]:
    from vlmkit.eval.synth import document_image, text_image

    rows, gold = [], []
    for i in range(n):
        subject = SUBJECTS[i % len(SUBJECTS)]
        word, opts, right = _word_question(rng, 10)
        letter = chr(ord("A") + right)
        base = {"id": f"test_{subject}_{i // len(SUBJECTS) + 1}", "options": str(opts), "answer": letter,
                "subject": subject}
        if vision:  # the question and its options photographed into one image
            page = document_image([(chr(ord("A") + k), o) for k, o in enumerate(opts)], f"Which word? ({word})")
            rows.append({**base, "image": {"bytes": _png(page), "path": None}})
        else:
            rows.append({**base, "question": "Which word is written in <image 1>?", "explanation": "",
                         "image_1": {"bytes": _png(text_image(word)), "path": None},
                         **{f"image_{k}": None for k in range(2, 8)}, "img_type": "['Text']",
                         "topic_difficulty": "Easy"})
        gold.append((base["id"], letter))
    folder = "vision" if vision else "standard (10 options)"
    _write_parquet(root / folder / "test-00000-of-00001.parquet", rows)
    return gold, n


def synth_mmmu_pro_standard(root: Path, n: int, rng: random.Random) -> tuple[Gold, int]:
    return _mmmu_pro(root, n, rng, vision=False)


def synth_mmmu_pro_vision(root: Path, n: int, rng: random.Random) -> tuple[Gold, int]:
    return _mmmu_pro(root, n, rng, vision=True)


CHOICE_SYNTHESIZERS = {
    "mmbench": synth_mmbench, "mmstar": synth_mmstar,
    "mmmu-pro-standard": synth_mmmu_pro_standard, "mmmu-pro-vision": synth_mmmu_pro_vision,
}
