"""`synth-media`: the synthetic multi-image and video tasks (`vlmkit.data.synthetic.multi_image`
and `.video` write them), scored by exact match after normalisation, broken down by task."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from vlmkit.core.types import BadRecordError
from vlmkit.data.formats import record_to_sample
from vlmkit.processing.images import ImageLoadError, load_image
from vlmkit.processing.video import VideoInput
from vlmkit.registry import BENCHMARKS

from .base import Benchmark, BenchItem, EvalInputError, ScoreResult, checked_items, group_ids, read_json_list


@dataclass
class MediaItem(BenchItem):
    """A question over images and videos; `load_images` returns them in placeholder order
    (videos as `VideoInput`), which is what the vlmkit backend's processor takes."""

    media: list[tuple[str, Path]] = field(default_factory=list)

    def load_images(self):
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
        path = Path(data_dir)
        path = path / "test.json" if path.is_dir() else path
        records = read_json_list(path, "records")
        items = []
        for i, rec in enumerate(records):
            try:
                sample = record_to_sample(rec, i, path.parent, str(path))
            except BadRecordError as e:
                raise EvalInputError(str(e)) from None
            question = sample.messages[0].content
            kinds = [m.group(1) for m in re.finditer(r"<(image|video)>", question)]
            it_img, it_vid = iter(sample.images), iter(sample.videos)
            media = [(k, next(it_img) if k == "image" else next(it_vid)) for k in kinds]
            # The backend's convention is one `<image>` per visual input; the input decides how it expands.
            prompt = re.sub(r"<(image|video)>", "<image>", question)
            answer = rec.get("answer")
            if not isinstance(answer, str) or not answer.strip():
                # A training-style record without the synthetic sets' `answer` field: say which
                # record, and where such a file is scored (its last assistant turn is the answer).
                raise EvalInputError(
                    f"{path}: record {sample.id!r} has no 'answer' field; synth-media reads the synthetic sets "
                    "that `vlmkit data synth-train` writes (each record carries its answer in 'answer'). "
                    f"To score your own file, whose last assistant turn is the answer: -b custom:{path}")
            items.append(MediaItem(id=sample.id, question=prompt, images=[p for _, p in media],
                                   answers=[answer], metadata={"task": rec.get("task", "")}, media=media))
        return checked_items(items, path)

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
                           len(items), n_pred, len(items) - n_pred, per_item=per_item,
                           groups=group_ids(items, lambda it: [it.metadata.get("task", "")]))
