"""`vlmkit eval prepare BENCH FROM TO`: the Hugging Face copies lmms-eval reads -> official layouts.

lmms-eval reads each benchmark from a parquet copy on the Hugging Face Hub (images embedded as
`{"bytes", "path"}` structs). vlmkit's loaders read the layout the benchmark's authors publish.
One converter per benchmark, registered in `PREPARERS` with the dataset id, the split it reads
and the columns it relies on, turns the first into the second: questions and answers into the
official JSON files, images written as their original bytes where the loader looks for them.

The output is written to a staging folder beside TO, checked by the benchmark's own loader, and
swapped in whole (`vlmkit.utils.replace_folder`). TO is only replaced when it is empty or an
earlier `eval prepare` output (it holds `PREPARED_MARKER`).
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from vlmkit.eval.benchmarks import get_benchmark
from vlmkit.eval.benchmarks.base import EvalInputError
from vlmkit.utils import replace_folder

PREPARED_MARKER = ".vlmkit-prepared.json"
_EXT = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


@dataclass
class Row:
    """One parquet row, with errors that name the shard, the row and the column."""

    shard: Path
    index: int
    values: dict[str, Any]

    def where(self, column: str) -> str:
        return f"{self.shard}: row {self.index}, column {column!r}"

    def __getitem__(self, column: str) -> Any:
        value = self.values.get(column)
        if value is None:
            raise EvalInputError(f"{self.where(column)}: empty (null) value")
        return value

    def get(self, column: str, default: Any = None) -> Any:
        value = self.values.get(column)
        return default if value is None else value

    def image(self, column: str) -> tuple[bytes, str]:
        """The image's original bytes and the file extension of its format, after checking that
        it decodes (a truncated or non-image cell fails here, not in the middle of an eval run)."""
        cell = self[column]
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise EvalInputError(f"{self.where(column)}: no embedded image bytes")
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format
                img.load()
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise EvalInputError(f"{self.where(column)}: not a decodable image ({e})") from None
        return bytes(data), _EXT.get(fmt or "", ".png")


@dataclass(frozen=True)
class Preparer:
    dataset: str  # the Hugging Face dataset id lmms-eval reads
    split: str  # the split converted (file names start with it: `validation-00000-of-00003.parquet`)
    columns: tuple[str, ...]  # the columns the converter relies on
    convert: Callable[[Iterator[Row], Path], int]  # rows -> official layout under the folder; returns items
    config: str | None = None  # the config folder to read when the copy has several (DocVQA / InfographicVQA)
    more_splits: tuple[str, ...] = ()  # further splits converted with the first (HallusionBench: image, non_image)


PREPARERS: dict[str, Preparer] = {}


def preparer(name: str, dataset: str, split: str, columns: tuple[str, ...], config: str | None = None,
             more_splits: tuple[str, ...] = ()):
    def register(fn: Callable[[Iterator[Row], Path], int]):
        PREPARERS[name] = Preparer(dataset, split, columns, fn, config, more_splits)
        return fn
    return register


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _save(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _str_list(row: Row, column: str) -> list[str]:
    value = row[column]
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise EvalInputError(f"{row.where(column)}: expected a list, got {type(value).__name__}")
    return [str(v) for v in value]


def _int_or_str(value: Any) -> Any:
    """DocVQA's questionId is a string in the Hugging Face copy and an integer in the official file."""
    return int(value) if isinstance(value, str) and value.isdigit() else value


# ---------------------------------------------------------------------------------------------
# One converter per benchmark
# ---------------------------------------------------------------------------------------------

CHARTQA_TYPES = {"human_test": "test_human", "augmented_test": "test_augmented"}


@preparer("chartqa", "lmms-lab/ChartQA", "test", ("type", "question", "answer", "image"))
def prepare_chartqa(rows: Iterator[Row], out: Path) -> int:
    splits: dict[str, list[dict]] = {"test_human": [], "test_augmented": []}
    for row in rows:
        kind = str(row["type"])
        split = CHARTQA_TYPES.get(kind, kind if kind in splits else None)
        if split is None:
            raise EvalInputError(f"{row.where('type')}: unknown type {kind!r} (expected one of {', '.join(CHARTQA_TYPES)})")
        data, ext = row.image("image")
        name = f"{split}_{len(splits[split]):05d}{ext}"  # the copy drops the official imgname
        _save(out / "test" / "png" / name, data)
        splits[split].append({"imgname": name, "query": str(row["question"]), "label": str(row["answer"])})
    for split, recs in splits.items():
        if recs:
            _write_json(out / "test" / f"{split}.json", recs)
    return sum(len(r) for r in splits.values())


@preparer("docvqa", "lmms-lab/DocVQA", "validation",
          ("questionId", "question", "question_types", "image", "docId", "answers"), config="DocVQA")
def prepare_docvqa(rows: Iterator[Row], out: Path) -> int:
    data = []
    for row in rows:
        page = f"{row.get('ucsf_document_id', row['docId'])}_{row.get('ucsf_document_page_no', '1')}"
        image, ext = row.image("image")
        rel = f"documents/{page}{ext}"
        if not (out / rel).exists():  # a page is asked about several times; it is written once
            _save(out / rel, image)
        data.append({"questionId": _int_or_str(row["questionId"]), "question": str(row["question"]),
                     "question_types": _str_list(row, "question_types"), "image": rel, "docId": row["docId"],
                     "ucsf_document_id": row.get("ucsf_document_id"), "ucsf_document_page_no": row.get("ucsf_document_page_no"),
                     "answers": _str_list(row, "answers"), "data_split": "val"})
    _write_json(out / "val_v1.0.json", {"dataset_name": "docvqa", "dataset_split": "val", "dataset_version": "1.0",
                                        "data": data})
    return len(data)


@preparer("ocrbench", "echo840/OCRBench", "test",
          ("dataset", "question", "question_type", "answer", "image"))
def prepare_ocrbench(rows: Iterator[Row], out: Path) -> int:
    recs = []
    for row in rows:
        dataset = str(row["dataset"])
        data, ext = row.image("image")
        rel = f"{dataset}/{len(recs)}{ext}"
        _save(out / "OCRBench_Images" / rel, data)
        answer = row["answer"]
        answers = str(answer) if isinstance(answer, str) else _str_list(row, "answer")
        recs.append({"dataset_name": dataset, "id": len(recs), "image_path": rel, "question": str(row["question"]),
                     "answers": answers, "type": str(row["question_type"])})
    _write_json(out / "OCRBench.json", recs)
    return len(recs)


@preparer("textvqa", "lmms-lab/textvqa", "validation", ("question_id", "question", "image_id", "answers", "image"))
def prepare_textvqa(rows: Iterator[Row], out: Path) -> int:
    data = []
    for row in rows:
        image_id = str(row["image_id"])
        path = out / "train_images" / f"{image_id}.jpg"  # the loader's name; the bytes are the copy's own
        if not path.exists():
            _save(path, row.image("image")[0])
        data.append({"question": str(row["question"]), "image_id": image_id, "image_classes": row.get("image_classes"),
                     "question_id": row["question_id"], "answers": _str_list(row, "answers"),
                     "set_name": row.get("set_name", "val")})
    _write_json(out / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa",
                                                 "dataset_version": "0.5.1", "data": data})
    return len(data)


@preparer("vqav2", "lmms-lab/VQAv2", "validation", ("question_id", "question", "image_id", "answers", "image"))
def prepare_vqav2(rows: Iterator[Row], out: Path) -> int:
    questions, annotations = [], []
    for row in rows:
        image_id = int(row["image_id"])
        path = out / "val2014" / f"COCO_val2014_{image_id:012d}.jpg"
        if not path.exists():
            _save(path, row.image("image")[0])
        answers = row["answers"]
        if not isinstance(answers, list) or not all(isinstance(a, dict) and "answer" in a for a in answers):
            raise EvalInputError(f'{row.where("answers")}: expected a list of {{"answer", ...}} objects')
        questions.append({"image_id": image_id, "question": str(row["question"]), "question_id": row["question_id"]})
        annotations.append({"question_id": row["question_id"], "image_id": image_id,
                            "question_type": row.get("question_type"), "answer_type": row.get("answer_type"),
                            "multiple_choice_answer": row.get("multiple_choice_answer"), "answers": answers})
    _write_json(out / "v2_OpenEnded_mscoco_val2014_questions.json",
                {"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "questions": questions})
    _write_json(out / "v2_mscoco_val2014_annotations.json", {"data_subtype": "val2014", "annotations": annotations})
    return len(questions)


@preparer("mathvista", "AI4Math/MathVista", "testmini",
          ("pid", "question", "decoded_image", "answer", "question_type", "answer_type"))
def prepare_mathvista(rows: Iterator[Row], out: Path) -> int:
    data: dict[str, dict] = {}
    for row in rows:
        pid = str(row["pid"])
        if pid in data:
            raise EvalInputError(f"{row.where('pid')}: pid {pid!r} appears twice")
        image, ext = row.image("decoded_image")
        rel = f"images/{pid}{ext}"
        _save(out / rel, image)
        choices = row.get("choices")
        data[pid] = {"question": str(row["question"]), "image": rel, "choices": list(choices) if choices is not None else None,
                     "unit": row.get("unit"), "precision": row.get("precision"), "answer": str(row["answer"]),
                     "question_type": str(row["question_type"]), "answer_type": str(row["answer_type"]), "pid": pid,
                     "metadata": row.get("metadata") or {}, "query": row.get("query")}
    _write_json(out / "testmini.json", data)
    return len(data)


@preparer("mmmu", "MMMU/MMMU", "validation", ("id", "question", "options", "answer", "question_type", "image_1"))
def prepare_mmmu(rows: Iterator[Row], out: Path) -> int:
    """MMMU's Hugging Face release (one config per subject) is its official layout: each shard is
    checked (columns, the first image of every row) and copied to `<Subject>/`."""
    shards: dict[Path, int] = {}
    for row in rows:
        row.image("image_1")
        shards[row.shard] = shards.get(row.shard, 0) + 1
    for shard in shards:
        (out / shard.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(shard, out / shard.parent.name / shard.name)
    return sum(shards.values())


def _safe_relative(row: Row, column: str, value: str) -> Path:
    """A file name from the copy, as a path inside the output folder (no absolute path, no `..`)."""
    rel = Path(value.removeprefix("./"))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise EvalInputError(f"{row.where(column)}: {value!r} is not a relative file name inside the benchmark folder")
    return rel


@preparer("pope", "lmms-lab/POPE", "test", ("question_id", "question", "answer", "image_source", "image", "category"))
def prepare_pope(rows: Iterator[Row], out: Path) -> int:
    """One JSON-lines question file per negative-sampling split, as the POPE repository ships them
    (`output/coco/coco_pope_<split>.json`), and the COCO val2014 images they name."""
    from vlmkit.eval.benchmarks.pope import SPLITS

    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for row in rows:
        split = str(row["category"])
        if split not in splits:
            raise EvalInputError(f"{row.where('category')}: unknown split {split!r} (expected one of {', '.join(SPLITS)})")
        name = str(row["image_source"])
        name = name if Path(name).suffix else f"{name}.jpg"
        path = out / "val2014" / _safe_relative(row, "image_source", name)
        if not path.exists():  # an image is asked about six times per split
            _save(path, row.image("image")[0])
        answer = str(row["answer"]).strip().lower()
        if answer not in ("yes", "no"):
            raise EvalInputError(f"{row.where('answer')}: {row['answer']!r} is neither yes nor no")
        record = {"question_id": _int_or_str(str(row["question_id"])), "image": path.name, "text": str(row["question"]),
                  "label": answer}
        splits[split].append(json.dumps(record, ensure_ascii=False))
    for split, lines in splits.items():
        if lines:
            path = out / "output" / "coco" / f"coco_pope_{split}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return sum(len(v) for v in splits.values())


# The release keeps these subtasks' images and question files in two subfolders; the others side by side.
MME_NESTED = ("artwork", "celebrity", "landmark", "posters", "scene")


@preparer("mme", "lmms-lab/MME", "test", ("question_id", "question", "answer", "category", "image"))
def prepare_mme(rows: Iterator[Row], out: Path) -> int:
    """`MME_Benchmark_release_version/<subtask>/`: each image with a text file of its two
    `question<TAB>answer` lines (in `images/` and `questions_answers_YN/` where the release nests them)."""
    from vlmkit.eval.benchmarks.mme import COGNITION, PERCEPTION, RELEASE_DIR

    lines: dict[Path, list[str]] = {}
    for row in rows:
        subtask = str(row["category"])
        if subtask not in PERCEPTION + COGNITION:
            raise EvalInputError(f"{row.where('category')}: unknown subtask {subtask!r}")
        image_name = _safe_relative(row, "question_id", str(row["question_id"])).name  # "<subtask>/<image>"
        folder = out / RELEASE_DIR / subtask
        image_dir, text_dir = (folder / "images", folder / "questions_answers_YN") if subtask in MME_NESTED else (folder, folder)
        if not (image_dir / image_name).exists():
            _save(image_dir / image_name, row.image("image")[0])
        question = str(row["question"])
        if "\t" in question or "\n" in question:
            raise EvalInputError(f"{row.where('question')}: a tab or line break cannot be written to the release's text files")
        lines.setdefault(text_dir / f"{Path(image_name).stem}.txt", []).append(f"{question}\t{str(row['answer']).strip()}")
    for path, pair in lines.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(pair) + "\n", encoding="utf-8")
    return sum(len(v) for v in lines.values())


HALLUSION_FIELDS = ("category", "subcategory", "visual_input", "set_id", "figure_id", "sample_note", "question_id",
                    "question", "gt_answer_details", "gt_answer", "filename")


@preparer("hallusionbench", "lmms-lab/HallusionBench", "image",
          ("category", "subcategory", "visual_input", "set_id", "figure_id", "question_id", "question", "gt_answer",
           "filename", "image"), more_splits=("non_image",))
def prepare_hallusionbench(rows: Iterator[Row], out: Path) -> int:
    """`HallusionBench.json` (the repository's question file; the copy's `image` and `non_image`
    splits together) and each figure at its `filename`."""
    records = []
    for row in rows:
        record = {k: row.get(k) for k in HALLUSION_FIELDS}
        for k in ("category", "subcategory", "visual_input", "set_id", "figure_id", "question_id", "gt_answer"):
            record[k] = str(row[k])
        if record["filename"] and record["visual_input"] != "0":
            path = out / _safe_relative(row, "filename", str(record["filename"]))
            if not path.exists():
                _save(path, row.image("image")[0])
        records.append(record)
    _write_json(out / "HallusionBench.json", records)
    return len(records)


MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "E", "answer", "category", "image", "source",
                   "l2-category", "comment", "split")


@preparer("mmbench", "lmms-lab/MMBench", "dev", ("index", "question", "A", "B", "answer", "category", "image"), config="en")
def prepare_mmbench(rows: Iterator[Row], out: Path) -> int:
    """VLMEvalKit's `MMBench_DEV_EN.tsv`: one row per rotation of a question's options, images base64."""
    import base64

    import pandas as pd

    records = []
    for row in rows:
        record = {k: row.values.get(k) for k in MMBENCH_COLUMNS}
        record["l2-category"] = row.values.get("L2-category", record["l2-category"])
        record["index"] = int(row["index"])
        record["image"] = base64.b64encode(row.image("image")[0]).decode("ascii")
        records.append(record)
    frame = pd.DataFrame.from_records(records, columns=list(MMBENCH_COLUMNS)).dropna(axis=1, how="all")
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "MMBench_DEV_EN.tsv", sep="\t", index=False)
    return len(records)


# ---------------------------------------------------------------------------------------------
# Reading the shards, and the command
# ---------------------------------------------------------------------------------------------


def find_shards(source: Path, split: str, config: str | None = None) -> list[Path]:
    """The parquet shards of `split` under `source` (a file is taken as it is); where the copy has a
    `config` folder, only the shards in it (lmms-lab/DocVQA also holds InfographicVQA)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise EvalInputError(f"{source}: not found")
    found = sorted(source.rglob("*.parquet"))
    shards = [p for p in found if p.name.startswith((f"{split}-", f"{split}.")) or split in p.relative_to(source).parts[:-1]]
    if not shards:
        seen = ", ".join(str(p.relative_to(source)) for p in found[:5]) or "none"
        raise EvalInputError(f"{source}: no parquet shard of split {split!r} ({split}-*.parquet or {split}/*.parquet); "
                             f"parquet files found: {seen}")
    in_config = [p for p in shards if config in p.relative_to(source).parts[:-1]]
    return in_config or shards


def iter_rows(shards: list[Path], columns: tuple[str, ...], progress: bool = False) -> Iterator[Row]:
    """Each row of each shard, after checking that every shard has `columns`; a progress bar over
    all rows when `progress`."""
    # pyarrow is a core dependency, but only this command and the MMMU loader need it.
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    files = []
    for shard in shards:
        try:
            f = pq.ParquetFile(shard)
        except (pa.ArrowException, OSError) as e:
            raise EvalInputError(f"{shard}: not a readable parquet file ({type(e).__name__}: {e})") from None
        missing = [c for c in columns if c not in f.schema_arrow.names]
        if missing:
            raise EvalInputError(f"{shard}: no column {', '.join(map(repr, missing))} "
                                 f"(it has {', '.join(f.schema_arrow.names)})")
        files.append((shard, f))
    with tqdm(total=sum(f.metadata.num_rows for _, f in files), desc="prepare", unit="row", disable=not progress) as bar:
        for shard, f in files:
            index = 0
            for batch in f.iter_batches(batch_size=256):
                for values in batch.to_pylist():
                    yield Row(shard, index, values)
                    index += 1
                    bar.update(1)


def check_target(target: Path) -> None:
    """Refuse to replace anything but an empty folder or an earlier `eval prepare` output."""
    if target.is_file() or target.is_symlink():
        raise EvalInputError(f"{target}: exists and is not a folder; give a new folder")
    if target.is_dir() and any(target.iterdir()) and not (target / PREPARED_MARKER).is_file():
        raise EvalInputError(f"{target}: is not empty and is not an earlier `vlmkit eval prepare` output "
                             f"(no {PREPARED_MARKER}); give a new or empty folder")


def prepare_benchmark(name: str, source: str | Path, target: str | Path, progress: bool = False) -> dict[str, Any]:
    """Convert the Hugging Face copy of `name` at `source` into its official layout at `target`."""
    name = name.lower()
    if name not in PREPARERS:
        raise EvalInputError(f"cannot prepare {name!r}; `eval prepare` knows {', '.join(sorted(PREPARERS))}")
    prep = PREPARERS[name]
    source, target = Path(source), Path(target)
    check_target(target)
    shards = find_shards(source, prep.split, prep.config)
    splits, missing = [prep.split], []
    for split in prep.more_splits:  # converted where the copy has them; a missing one is reported, not fatal
        try:
            shards += find_shards(source, split, prep.config)
            splits.append(split)
        except EvalInputError:
            missing.append(split)
    shards = list(dict.fromkeys(shards))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.prepare-", dir=target.parent))
    try:
        n = prep.convert(iter_rows(shards, prep.columns, progress), staging)
        items = get_benchmark(name).load(staging)  # the output must read back with the real loader
        if len(items) != n:
            raise EvalInputError(f"{name}: wrote {n} rows but the loader reads {len(items)} items")
        info = {"benchmark": name, "dataset": prep.dataset, "split": ", ".join(splits), "items": n,
                "shards": [str(s) for s in shards], **({"missing_splits": missing} if missing else {})}
        _write_json(staging / PREPARED_MARKER, info)
        check_target(target)  # again: something may have been put there while converting
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {**info, "dir": str(target)}
