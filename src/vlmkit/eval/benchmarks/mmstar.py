"""MMStar (Chen et al. 2024): 1,500 vision-indispensable multiple-choice questions in six core
capabilities of three sub-categories each, scored by the official MMStar rule."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from vlmkit.eval.choice_rules import mmstar_correct
from vlmkit.registry import BENCHMARKS

from .base import BenchItem, Benchmark, EvalInputError, ScoreResult, check_prediction_ids, checked_items

PARQUET_NAMES = ("mmstar.parquet", "val.parquet")
COLUMNS = ("index", "question", "image", "answer", "category", "l2_category")


def read_parquet_rows(path: Path, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows of a parquet file; a missing column or an unreadable file names the file."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise EvalInputError("reading parquet files needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise EvalInputError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise EvalInputError(f"{path}: missing column(s) {', '.join(missing)}; has {', '.join(table.column_names)}")
    return table.to_pylist()


def image_cell(cell: Any, parent: Path, where: str) -> list:
    """An image column as `datasets` writes it ({"bytes", "path"}) or raw bytes."""
    if isinstance(cell, dict) and cell.get("bytes"):
        return [cell["bytes"]]
    if isinstance(cell, dict) and cell.get("path"):
        return [parent / cell["path"]]
    if isinstance(cell, (bytes, bytearray)) and cell:
        return [bytes(cell)]
    if cell is None:
        return []
    raise EvalInputError(f"{where}: the image cell is neither bytes nor a {{bytes, path}} struct")


def find_parquet(data: Path, names: tuple[str, ...], what: str) -> Path:
    if data.is_file():
        return data
    if not data.is_dir():
        raise EvalInputError(f"{data}: benchmark data folder not found")
    for name in names:
        if (data / name).is_file():
            return data / name
    raise EvalInputError(f"{data}: no {what} found (looked for {', '.join(names)})")


class MMStar(Benchmark):
    name = "mmstar"
    metric = "accuracy, per core capability and per capability(sub-category), by the official MMStar rule"
    parser = ("MMStar rule on the lower-cased, stripped response: its first character, or the one after '(', "
              "'option ' or 'the answer is ', equals the gold letter")
    prompt_template = "{question (with its Options: line)}\\nAnswer with the option's letter from the given choices directly."
    source = "MMStar-Benchmark/MMStar eval/vlmeval/evaluate/mmstar.py (MMStar_eval)"
    default_max_new_tokens = 32

    def load(self, data_dir) -> list[BenchItem]:
        path = find_parquet(Path(data_dir), PARQUET_NAMES, "MMStar parquet")
        items = []
        for n, r in enumerate(read_parquet_rows(path, COLUMNS)):
            where = f"{path}: row {n} (index {r.get('index')!r})"
            if r["answer"] in (None, ""):
                raise EvalInputError(f"{where}: empty answer")
            items.append(BenchItem(
                id=str(r["index"]), question=str(r["question"]), images=image_cell(r["image"], path.parent, where),
                answers=[str(r["answer"])],
                metadata={"category": str(r["category"]), "l2_category": str(r["l2_category"]),
                          "meta_info": r.get("meta_info")}))
        return checked_items(items, path)

    def prompt(self, item: BenchItem) -> str:
        return f"{item.question}\nAnswer with the option's letter from the given choices directly."

    def score(self, items, predictions) -> ScoreResult:
        check_prediction_ids(self.name, items, predictions)
        per_item: dict[str, float] = {}
        groups: dict[str, list[str]] = defaultdict(list)
        for it in items:
            ok = it.id in predictions and mmstar_correct(predictions[it.id], it.answers[0])
            per_item[it.id] = float(ok)
            cat, sub = it.metadata["category"], it.metadata["l2_category"]
            groups[cat].append(it.id)
            groups[f"{cat}({sub})"].append(it.id)
        # The official script divides by 250 per capability and 1,500 overall: the counts of the
        # full set. Dividing by the counts gives the same numbers there, and a mean on a subset.
        n = len(items)
        overall = sum(per_item.values()) / n if n else 0.0
        breakdown = {k: sum(per_item[i] for i in v) / len(v) for k, v in sorted(groups.items())}
        n_pred = sum(1 for it in items if it.id in predictions)
        return ScoreResult(
            benchmark=self.name, overall=overall, display=f"{overall:.4f}", breakdown=breakdown,
            metric=self.metric, parser=self.parser, n_items=n, n_predicted=n_pred, n_missing=n - n_pred,
            extra={"correct": int(sum(per_item.values()))}, per_item=per_item,
            groups={k: groups[k] for k in sorted(groups)},
        )


BENCHMARKS.register("mmstar")(MMStar)
