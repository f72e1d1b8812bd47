"""CHAIR (Rohrbach et al. 2018): object hallucination in image descriptions, on COCO images."""

from __future__ import annotations

from vlmkit.eval.metrics import chair, chair_mentions
from vlmkit.registry import BENCHMARKS

from .base import BenchItem, Benchmark, EvalInputError, ScoreResult, check_prediction_ids, checked_items, read_json, require_dir


class Chair(Benchmark):
    name = "chair"
    metric = ("CHAIRs (captions with a hallucinated object / captions) and CHAIRi (hallucinated mentions / mentions); "
              "lower is better (Rohrbach et al. 2018, chair.py); overall = CHAIRs")
    parser = "COCO synonym matching with singularisation (vlmkit synonym table)"
    prompt_template = "Please describe this image in detail."
    default_max_new_tokens = 256

    def load(self, data_dir) -> list[BenchItem]:
        root = require_dir(data_dir)
        found = sorted(root.glob("instances_*.json"))
        if not found:
            raise EvalInputError(f"{root}: no COCO instances_*.json found")
        inst = read_json(found[0])
        try:
            cats = {c["id"]: c["name"] for c in inst["categories"]}
            image_ids = [im["id"] for im in inst["images"]]
            files = {im["id"]: im["file_name"] for im in inst["images"]}
            if len(files) != len(image_ids):
                seen: set = set()
                dup = next(i for i in image_ids if i in seen or seen.add(i))
                raise EvalInputError(f'{found[0]}: 1 duplicate item id(s): {str(dup)!r} (an image listed twice under "images"); '
                                     "each item needs its own id")
            gt: dict[int, set[str]] = {iid: set() for iid in image_ids}
            for i, a in enumerate(inst["annotations"]):
                if a["image_id"] not in gt:
                    raise EvalInputError(f'{found[0]}: annotations[{i}]: image_id {a["image_id"]!r} is not under "images"')
                gt[a["image_id"]].add(cats[a["category_id"]])
        except (KeyError, TypeError) as e:
            raise EvalInputError(f"{found[0]}: not a COCO instances file (missing {e})") from None
        # As in CHAIR, objects named in the reference captions also count as present.
        caps = sorted(root.glob("captions_*.json"))
        if caps:
            doc = read_json(caps[0])
            anns = doc.get("annotations", []) if isinstance(doc, dict) else None
            if not isinstance(anns, list) or not all(isinstance(a, dict) for a in anns):
                raise EvalInputError(f'{caps[0]}: expected an object with an "annotations" list of objects')
            for a in anns:
                if a.get("image_id") in gt:
                    gt[a["image_id"]].update(chair_mentions(str(a.get("caption", ""))))
        subset = found[0].stem.replace("instances_", "")
        image_dir = root / subset if (root / subset).is_dir() else root / "images"
        items = [BenchItem(id=str(iid), question=self.prompt_template, images=[image_dir / files[iid]],
                           answers=sorted(objs), metadata={"image_id": iid}) for iid, objs in sorted(gt.items())]
        # An image without objects is a fair question (every mention is a hallucination); ids
        # 1 and "1" would still collide once made strings.
        return checked_items(items, found[0], answers_required=False)

    def prompt(self, item: BenchItem) -> str:
        return self.prompt_template

    def score(self, items, predictions) -> ScoreResult:
        check_prediction_ids(self.name, items, predictions)
        captions = {it.id: predictions[it.id] for it in items if it.id in predictions}
        gt = {it.id: set(it.answers) for it in items}
        res = chair(captions, gt)
        mentioned = sum(len(set(chair_mentions(c)) & gt[k]) for k, c in captions.items())
        total_gt = sum(len(gt[k]) for k in captions)
        n = len(items)
        return ScoreResult(
            benchmark=self.name, overall=res.chair_s,
            display=f"CHAIRs {100 * res.chair_s:.1f} CHAIRi {100 * res.chair_i:.1f}",
            breakdown={"CHAIRs": res.chair_s, "CHAIRi": res.chair_i, "recall": mentioned / total_gt if total_gt else 0.0},
            metric=self.metric, parser=self.parser, n_items=n, n_predicted=len(captions), n_missing=n - len(captions),
            extra={"mentions": res.n_mentions, "hallucinated_mentions": res.n_hallucinated,
                   "hallucinated": {k: v for k, v in res.per_caption.items() if v}},
            per_item={k: float(bool(v)) for k, v in res.per_caption.items()},
        )


BENCHMARKS.register("chair")(Chair)
