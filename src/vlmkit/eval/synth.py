"""`vlmkit data synth-bench NAME DIR`: tiny synthetic benchmarks in their official layouts.

Each benchmark gets rendered images (text, bar charts, documents, shapes) and questions whose
answers are known by construction, written exactly where and how the official release puts
them, so the real loaders and scorers run end to end on them. `gold_predictions.jsonl`
holds the gold answers as a predictions file (they must score 100%, CHAIR 0).
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageDraw, ImageFont

from vlmkit.eval.benchmarks.base import EvalInputError
from vlmkit.eval.synth_choice import CHOICE_SYNTHESIZERS

GOLD_NAME = "gold_predictions.jsonl"
WORDS = ["CENTRE", "FRIEND", "OCEAN", "MARKET", "GARDEN", "PLANET", "SILVER", "RIVER", "WINTER", "BRIDGE",
         "CASTLE", "FOREST", "ORANGE", "TICKET", "SUMMER", "PENCIL"]
CATEGORIES = ["Apples", "Pears", "Plums", "Kiwis", "Limes", "Figs"]
COLORS = ["red", "blue", "green", "orange", "purple", "brown"]


@lru_cache(maxsize=8)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:
        return ImageFont.load_default()


def text_image(text: str, size=(320, 96), fg="black", bg="white", font_size=40) -> Image.Image:
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    box = d.textbbox((0, 0), text, font=font(font_size))
    d.text(((size[0] - (box[2] - box[0])) / 2, (size[1] - (box[3] - box[1])) / 2 - box[1]), text, fill=fg,
           font=font(font_size))
    return img


def bar_chart(labels: list[str], values: list[float], title: str, colors: list[str] | None = None) -> Image.Image:
    w, h, pad = 480, 320, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 8), title, fill="black", font=font(16))
    top = max(values) * 1.15 or 1
    bw = (w - 2 * pad) / len(values)
    for i, (lab, v) in enumerate(zip(labels, values)):
        x0 = pad + i * bw + bw * 0.15
        y0 = h - pad - (h - 2 * pad - 20) * v / top
        d.rectangle([x0, y0, x0 + bw * 0.7, h - pad], fill=(colors or COLORS)[i % len(COLORS)])
        d.text((x0, y0 - 16), f"{v:g}", fill="black", font=font(12))
        d.text((x0, h - pad + 4), lab, fill="black", font=font(12))
    d.line([pad, h - pad, w - pad, h - pad], fill="black")
    return img


def document_image(fields: list[tuple[str, str]], title: str) -> Image.Image:
    img = Image.new("RGB", (500, 60 + 34 * len(fields)), "white")
    d = ImageDraw.Draw(img)
    d.text((20, 14), title, fill="black", font=font(22))
    for i, (k, v) in enumerate(fields):
        d.text((20, 56 + 34 * i), f"{k}: {v}", fill="black", font=font(18))
    return img


def shapes_image(n_circles: int, n_squares: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (256, 256), "white")
    d = ImageDraw.Draw(img)
    for k in range(n_circles + n_squares):
        x, y = 20 + (k % 4) * 58, 20 + (k // 4) * 58
        if k < n_circles:
            d.ellipse([x, y, x + 40, y + 40], fill=rng.choice(COLORS))
        else:
            d.rectangle([x, y, x + 40, y + 40], fill=rng.choice(COLORS))
    return img


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# One writer per benchmark: returns [(id, gold prediction)] and the number of images
# ---------------------------------------------------------------------------------------------

Gold = list[tuple[Any, str]]


def synth_ocrbench(root: Path, n: int, rng: random.Random) -> tuple[Gold, int]:
    kinds = [  # (dataset_name, type, question)
        ("IIIT5K", "Regular Text Recognition", "what is written in the image?"),
        ("ct80", "Irregular Text Recognition", "what is written in the image?"),
        ("WordArt", "Artistic Text Recognition", "what is written in the image?"),
        ("IAM", "Handwriting Recognition", "what is written in the image?"),
        ("ORAND", "Digit String Recognition", "what is the number in the image?"),
        ("NonSemanticText", "Non-Semantic Text Recognition", "what is written in the image?"),
        ("textVQA", "Scene Text-centric VQA", "what does the sign say?"),
        ("docVQA", "Doc-oriented VQA", "what is the invoice number?"),
        ("FUNSD", "Key Information Extraction", "what is the value for 'DATE'?"),
        ("HME100k", "Handwritten Mathematical Expression Recognition",
         "Please write out the expression of the formula in the image using LaTeX format."),
    ]
    rows, gold = [], []
    for i in range(max(n, len(kinds))):
        ds, typ, q = kinds[i % len(kinds)]
        if ds == "ORAND":
            text = str(rng.randint(1000, 99999))
            answers: Any = text
        elif ds == "HME100k":
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            text = f"x^{a}+{b}"
            answers = [f"x ^ {{ {a} }} + {b}\n", f"x^{a}+{b}\n"]
        elif ds == "docVQA":
            text = f"INV-{rng.randint(100, 999)}"
            answers = [text]
        elif ds == "FUNSD":
            text = f"{rng.randint(1, 28):02d}/0{rng.randint(1, 9)}/1998"
            answers = [text]
        else:
            text = rng.choice(WORDS)
            answers = text
        rel = f"{ds}/test/{i}.png"
        _save(text_image(text), root / "OCRBench_Images" / rel)
        # `id` repeats across source datasets in the real file; keep that property.
        rows.append({"dataset_name": ds, "id": i % 3, "image_path": rel, "question": q, "answers": answers, "type": typ})
        gold.append((i, text if ds != "HME100k" else text))
    _write_json(root / "OCRBench.json", rows)
    return gold, len(rows)


def synth_mathvista(root: Path, n: int, rng: random.Random) -> tuple[Gold, int]:
    data, gold = {}, []
    for i in range(n):
        pid = str(i + 1)
        k = rng.randint(3, 5)
        labels = CATEGORIES[:k]
        values = [rng.randint(1, 9) for _ in range(k)]
        while len(set(values)) < k:  # a unique maximum keeps the multiple-choice answer unambiguous
            values = [rng.randint(1, 9) for _ in range(k)]
        _save(bar_chart(labels, values, "Fruit sold"), root / "images" / f"{pid}.png")
        kind = i % 4
        base = {"image": f"images/{pid}.png", "unit": None, "pid": pid,
                "metadata": {"split": "testmini", "language": "english", "img_width": 480, "img_height": 320,
                             "source": "vlmkit-synth", "category": "math-targeted-vqa", "task": "figure question answering",
                             "context": "bar chart", "grade": "elementary school", "skills": ["statistical reasoning"]}}
        if kind == 0:
            rec = {"question": "Which fruit sold the most?", "choices": labels, "precision": None,
                   "answer": labels[values.index(max(values))], "question_type": "multi_choice", "answer_type": "text"}
        elif kind == 1:
            rec = {"question": f"How many bars have a value above {min(values)}?", "choices": None, "precision": None,
                   "answer": str(sum(v > min(values) for v in values)), "question_type": "free_form",
                   "answer_type": "integer"}
        elif kind == 2:
            rec = {"question": "What is the mean value of the bars?", "choices": None, "precision": 1,
                   "answer": str(round(sum(values) / k, 1)), "question_type": "free_form", "answer_type": "float"}
        else:
            rec = {"question": "List the bar values from left to right.", "choices": None, "precision": None,
                   "answer": str(values), "question_type": "free_form", "answer_type": "list"}
        data[pid] = {**rec, **base}
        gold.append((pid, rec["answer"]))
    _write_json(root / "testmini.json", data)
    return gold, n


def synth_chartqa(root: Path, n: int, rng: random.Random) -> tuple[Gold, int]:
    gold, n_img = [], 0
    for split in ("test_human", "test_augmented"):
        rows = []
        for i in range(n):
            k = rng.randint(3, 6)
            labels = rng.sample(CATEGORIES, k)
            values = [round(rng.uniform(1, 90), 1) for _ in range(k)]
            name = f"{split}_{i}.png"
            _save(bar_chart(labels, values, f"Sales {2000 + i}"), root / "test" / "png" / name)
            n_img += 1
            j = rng.randrange(k)
            if i % 2 == 0:
                q, a = f"What is the value of {labels[j]}?", f"{values[j]:g}"
            else:
                q, a = "Which category has the highest value?", labels[values.index(max(values))]
            rows.append({"imgname": name, "query": q, "label": a})
            gold.append((f"{split}/{i}", a))
        _write_json(root / "test" / f"{split}.json", rows)
    return gold, n_img


def synth_docvqa(root: Path, n: int, rng: random.Random) -> tuple[Gold, int]:
    data, gold = [], []
    for i in range(n):
        inv = f"{rng.randint(10000, 99999)}"
        date = f"{rng.randint(1, 28)} March {rng.randint(1990, 2005)}"
        total = f"${rng.randint(10, 999)}.{rng.randint(0, 99):02d}"
        name = f"doc_{i:04d}.png"
        _save(document_image([("Invoice No", inv), ("Date", date), ("Total", total)], "INVOICE"), root / "documents" / name)
        q, a, t = [("What is the invoice number?", [inv], ["form"]), ("What is the date?", [date, date.upper()], ["layout"]),
                   ("What is the total amount?", [total], ["form", "table/list"])][i % 3]
        qid = 50000 + i
        data.append({"questionId": qid, "question": q, "question_types": t, "image": f"documents/{name}",
                     "docId": i, "ucsf_document_id": f"synth{i:04d}", "ucsf_document_page_no": "1",
                     "answers": a, "data_split": "val"})
        gold.append((qid, a[0]))
    _write_json(root / "val_v1.0.json", {"dataset_name": "docvqa", "dataset_split": "val", "dataset_version": "1.0",
                                         "data": data})
    return gold, n


def synth_mmmu(root: Path, n: int, rng: random.Random) -> tuple[Gold, int]:
    subjects = ["Art", "Accounting", "Math", "Pharmacy", "History", "Computer_Science"]
    rows, gold, answer_dict = [], [], {}
    for i in range(n):
        subject = subjects[i % len(subjects)]
        sid = f"validation_{subject}_{i // len(subjects) + 1}"
        word = rng.choice(WORDS)
        _save(text_image(word), root / "images" / f"{sid}_1.png")
        if i % 4 == 3:
            a, b = rng.randint(2, 40), rng.randint(2, 40)
            rec = {"question": f"<image 1> The image shows a word. What is {a} + {b}?", "options": "[]",
                   "answer": str(a + b), "question_type": "open"}
            gold.append((sid, str(a + b)))
            answer_dict[sid] = {"question_type": "short-answer", "ground_truth": str(a + b)}
        else:
            opts = rng.sample(WORDS, 4)
            if word not in opts:
                opts[rng.randrange(4)] = word
            letter = chr(ord("A") + opts.index(word))
            rec = {"question": "Which word is written in <image 1>?", "options": str(opts), "answer": letter,
                   "question_type": "multiple-choice"}
            gold.append((sid, letter))
            answer_dict[sid] = {"question_type": "multiple-choice", "ground_truth": letter}
        rows.append({"id": sid, **rec, "explanation": "", "image_1": f"images/{sid}_1.png",
                     **{f"image_{k}": None for k in range(2, 8)}, "img_type": "['Text']",
                     "topic_difficulty": "Easy", "subfield": subject})
    _write_json(root / "validation.json", rows)
    _write_json(root / "answer_dict_val.json", answer_dict)
    return gold, n


def _vqa_answers(ans: str, alt: str, rng: random.Random) -> list[str]:
    k = rng.randint(0, 3)
    return [alt] * k + [ans] * (10 - k)


def synth_vqav2(root: Path, n: int, rng: random.Random) -> tuple[Gold, int]:
    qs, anns, gold = [], [], []
    words = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
    for i in range(n):
        image_id = 100 + i
        c, s = rng.randint(0, 4), rng.randint(0, 3)
        _save(shapes_image(c, s, rng), root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
        qid = image_id * 1000 + 1
        if i % 2 == 0:
            q, a, alt, at = "How many circles are there?", str(c), words[c], "number"
        else:
            q, a, alt, at = "Are there any squares?", "yes" if s else "no", "yes" if s else "no", "yes/no"
        answers = _vqa_answers(a, alt, rng)
        qs.append({"image_id": image_id, "question": q, "question_id": qid})
        anns.append({"question_id": qid, "image_id": image_id, "question_type": q.split()[0].lower(), "answer_type": at,
                     "multiple_choice_answer": a,
                     "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": j + 1} for j, x in enumerate(answers)]})
        gold.append((qid, a))
    _write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json",
                {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": "val2014",
                 "questions": qs})
    _write_json(root / "v2_mscoco_val2014_annotations.json",
                {"info": {}, "license": {}, "data_subtype": "val2014", "annotations": anns})
    return gold, n


def synth_textvqa(root: Path, n: int, rng: random.Random) -> tuple[Gold, int]:
    data, gold = [], []
    for i in range(n):
        word = rng.choice(WORDS)
        image_id = f"{rng.getrandbits(64):016x}"
        _save(text_image(word, bg="yellow"), root / "train_images" / f"{image_id}.jpg")
        qid = 34602 + i
        data.append({"question": "what does the sign say?", "image_id": image_id, "image_classes": ["Sign"],
                     "question_id": qid, "answers": _vqa_answers(word.lower(), word.lower() + ".", rng),
                     "flickr_original_url": "", "image_width": 320, "image_height": 96, "set_name": "val"})
        gold.append((qid, word.lower()))
    _write_json(root / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
                                                  "data": data})
    return gold, n


def synth_chair(root: Path, n: int, rng: random.Random) -> tuple[Gold, int]:
    names = ["dog", "car", "person", "chair", "bottle", "bicycle", "cup", "clock"]
    cats = [{"supercategory": "thing", "id": k + 1, "name": nm} for k, nm in enumerate(names)]
    images, anns, gold = [], [], []
    for i in range(n):
        image_id = 9000 + i
        objs = rng.sample(range(len(names)), rng.randint(1, 3))
        img = Image.new("RGB", (320, 240), "white")
        d = ImageDraw.Draw(img)
        for j, o in enumerate(objs):
            x = 10 + j * 100
            d.rectangle([x, 60, x + 90, 150], outline=COLORS[o % len(COLORS)], width=4)
            d.text((x + 6, 95), names[o], fill="black", font=font(18))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": o + 1, "bbox": [x, 60, 90, 90],
                         "area": 8100.0, "iscrowd": 0, "segmentation": []})
        fname = f"COCO_val2014_{image_id:012d}.jpg"
        _save(img, root / "val2014" / fname)
        images.append({"id": image_id, "file_name": fname, "width": 320, "height": 240})
        listed = [names[o] for o in objs]
        gold.append((image_id, "A picture showing a " + " and a ".join(listed) + "."))
    _write_json(root / "instances_val2014.json", {"info": {}, "licenses": [], "images": images, "annotations": anns,
                                                  "categories": cats})
    return gold, n


def _labelled_objects(names: list[str]) -> Image.Image:
    img = Image.new("RGB", (320, 240), "white")
    d = ImageDraw.Draw(img)
    for j, nm in enumerate(names):
        x = 10 + j * 100
        d.rectangle([x, 60, x + 90, 150], outline=COLORS[j % len(COLORS)], width=4)
        d.text((x + 6, 95), nm, fill="black", font=font(18))
    return img


def synth_pope(root: Path, n: int, rng: random.Random) -> tuple[Gold, int]:
    """Three splits over the same images, question ids restarting at 1, one "yes" per "no"."""
    names = ["dog", "car", "person", "chair", "bottle", "bicycle", "cup", "clock"]
    n_images = max(1, (n + 1) // 2)
    present = [rng.sample(names, 2) for _ in range(n_images)]
    for i, objs in enumerate(present):
        _save(_labelled_objects(objs), root / "val2014" / f"COCO_val2014_{9100 + i:012d}.jpg")
    gold = []
    for split in ("random", "popular", "adversarial"):
        lines = []
        for q in range(n):
            objs = present[(q // 2) % n_images]
            obj, label = (objs[0], "yes") if q % 2 == 0 else (rng.choice([x for x in names if x not in objs]), "no")
            lines.append({"question_id": q + 1, "image": f"COCO_val2014_{9100 + (q // 2) % n_images:012d}.jpg",
                          "text": f"Is there a {obj} in the image?", "label": label})
            gold.append((f"{split}/{q + 1}", label))
        path = root / "output" / "coco" / f"coco_pope_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    return gold, n_images


def synth_mme(root: Path, n: int, rng: random.Random) -> tuple[Gold, int]:
    """Two questions (a yes, a no) per image, in both of the release's folder layouts."""
    subtasks = [("existence", False), ("landmark", True), ("count", False), ("numerical_calculation", False),
                ("scene", True)]
    base, gold = root / "MME_Benchmark_release_version", []
    n_images = max(1, (n + 1) // 2)
    for i in range(n_images):
        subtask, nested = subtasks[i % len(subtasks)]
        word, other = rng.sample(WORDS, 2)
        stem = f"{i:04d}"
        img_dir, txt_dir = (base / subtask / "images", base / subtask / "questions_answers_YN") if nested else (base / subtask,) * 2
        _save(text_image(word), img_dir / f"{stem}.png")
        qs = [(f"Is the word in this image '{word}'? Please answer yes or no.", "Yes"),
              (f"Is the word in this image '{other}'? Please answer yes or no.", "No")]
        if rng.random() < 0.5:
            qs.reverse()
        txt_dir.mkdir(parents=True, exist_ok=True)
        (txt_dir / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in qs), encoding="utf-8")
        gold += [(f"{subtask}/{stem}.png#{k}", a) for k, (_, a) in enumerate(qs)]
    return gold, n_images


def synth_hallusionbench(root: Path, n: int, rng: random.Random) -> tuple[Gold, int]:
    """Question sets of two figures (the original and an edit) and two questions each."""
    rows, gold, n_images, set_id = [], [], 0, 0
    while len(gold) < n:
        cat, sub = [("VD", "illusion"), ("VS", "chart")][set_id % 2]
        words = rng.sample(WORDS, 2)
        for fig in (0, 1) if cat == "VD" else (1, 2):
            shown = words[fig % 2]
            rel = f"{cat}/{sub}/{set_id}_{fig}.png"
            _save(text_image(shown), root / "hallusion_bench" / rel)
            n_images += 1
            for qid, w in enumerate(words):
                gt = "1" if w == shown else "0"
                rows.append({"category": cat, "subcategory": sub, "visual_input": "1" if fig == (0 if cat == "VD" else 1) else "2",
                             "set_id": str(set_id), "figure_id": str(fig), "sample_note": "synthetic",
                             "question_id": str(qid), "question": f"Is the word in the figure '{w}'?",
                             "gt_answer_details": f"The word in the figure is '{shown}'.", "gt_answer": gt,
                             "filename": f"./{rel}"})
                gold.append((f"{cat}_{sub}_{set_id}_{fig}_{qid}", "Yes" if gt == "1" else "No"))
        set_id += 1
    _write_json(root / "HallusionBench.json", rows)
    return gold, n_images


def synth_ai2d(root: Path, n: int, rng: random.Random) -> tuple[Gold, int]:
    """The AI2 release: per-image question files, categories, and the test ids (one image left
    out of the test split, as the release's training images are)."""
    base, gold, test_ids, cats = root / "ai2d", [], [], {}
    n_images = max(1, (n + 1) // 2)
    for i in range(n_images + 1):
        word = rng.choice(WORDS)
        name = f"{i}.png"
        _save(text_image(word), base / "images" / name)
        cats[name] = ["partsOfA", "lifeCycles", "foodChainsWebs"][i % 3]
        questions = {}
        for k, q in enumerate(["Which word is written in the diagram?", "What does the diagram say?"]):
            opts = rng.sample([w for w in WORDS if w != word], 3) + [word]
            rng.shuffle(opts)
            questions[q] = {"abcLabel": k == 1, "answerTexts": opts, "correctAnswer": opts.index(word),
                            "questionId": f"{name}-{k}"}
            if i < n_images:
                gold.append((f"{name}-{k}", chr(ord("A") + opts.index(word))))
        _write_json(base / "questions" / f"{name}.json", {"imageName": name, "questions": questions})
        if i < n_images:
            test_ids.append(str(i))
    _write_json(base / "categories.json", cats)
    (root / "ai2d_test_ids.csv").write_text("\n".join(test_ids) + "\n", encoding="utf-8")
    return gold, n_images + 1


SYNTHESIZERS: dict[str, Callable[[Path, int, random.Random], tuple[Gold, int]]] = {
    "ocrbench": synth_ocrbench, "mathvista": synth_mathvista, "chartqa": synth_chartqa, "docvqa": synth_docvqa,
    "mmmu": synth_mmmu, "vqav2": synth_vqav2, "textvqa": synth_textvqa, "chair": synth_chair,
    "pope": synth_pope, "mme": synth_mme, "hallusionbench": synth_hallusionbench, "ai2d": synth_ai2d,
}  # fmt: skip
SYNTHESIZERS.update(CHOICE_SYNTHESIZERS)  # MMBench, MMStar, MMMU-Pro (eval/synth_choice.py)


def synth_bench(name: str, out_dir: str | Path, n: int = 12, seed: int = 0, write_gold: bool = True) -> dict[str, Any]:
    if name not in SYNTHESIZERS:
        raise EvalInputError(f"no synthetic version of {name!r}; known: {', '.join(sorted(SYNTHESIZERS))}")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    gold, n_images = SYNTHESIZERS[name](root, n, random.Random(f"{name}:{seed}"))
    if write_gold:
        (root / GOLD_NAME).write_text("".join(json.dumps({"id": k, "prediction": p}) + "\n" for k, p in gold), encoding="utf-8")
    return {"items": len(gold), "images": n_images, "dir": str(root)}
