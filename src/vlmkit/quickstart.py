"""`vlmkit quickstart`: a real small VLM from packaged pretrained parts, trained through stages
1-2 on built-in synthetic data, then evaluated against a blind baseline.

1. Generate the synthetic dataset (captions; chart, text and scene questions; held-out split
   whose images are never training images).
2. Train stage 1 (captions) and stage 2 (answer-only loss), connector only, with held-out checks
   every few steps (`train.eval`) plotted per question kind.
3. Answer the held-out questions with the image, and again without it (the blind baseline:
   the same LLM, the image removed from the prompt), beside a prior baseline (the answer most
   often given to that question in training), and score each task with its official rule: ChartQA relaxed accuracy for charts, OCRBench's matching rule for text,
   VQA-normalised exact match for scenes.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlmkit.config import Config, load_config
from vlmkit.data.synthetic.tasks import KINDS, question_kind
from vlmkit.data.synthetic.tasks import generate as generate_data
from vlmkit.eval.backends import VlmkitBackend
from vlmkit.eval.benchmarks.synth_qa import METRIC_NAMES, score_answer
from vlmkit.processing.images import load_image
from vlmkit.train.loop import run_training
from vlmkit.train.plots import plot_heldout, plot_losses
from vlmkit.utils import JsonlLogger, atomic_write_text, read_jsonl


def default_recipe() -> Path:
    return Path(str(resources.files("vlmkit") / "recipes" / "quickstart.yaml"))


@dataclass
class EvalRow:
    id: str
    task: str
    kind: str
    answer: str
    prediction: str
    correct: bool


def answer_questions(model, records: list[dict], image_root: Path, with_image: bool, batch_size: int = 16, max_new_tokens: int = 8,
                     desc: str = "", bf16: bool = False) -> list[EvalRow]:
    """Greedy answers through the same backend `vlmkit eval run` uses; blind runs drop the image."""
    backend = VlmkitBackend(model, bf16=bf16)
    rows: list[EvalRow] = []
    for start in tqdm(range(0, len(records), batch_size), desc=desc, unit="batch"):
        chunk = records[start : start + batch_size]
        requests = []
        for r in chunk:
            question = r["conversations"][0]["value"].replace("<image>", "").strip()
            requests.append((question, [load_image(image_root / r["image"])] if with_image else []))
        for r, pred in zip(chunk, backend.generate(requests, max_new_tokens)):
            rows.append(EvalRow(r["id"], r["task"], question_kind(r), r["answer"], pred, score_answer(r["task"], pred, r["answer"])))
    return rows


def _question(text: str) -> str:
    return text.replace("<image>", "").strip()


def prior_answers(records: list[dict], test: list[dict]) -> list[EvalRow]:
    """The prior baseline: for each question, the answer most often given to it in training,
    whatever the image shows. It tells how much a model can score from the question alone."""
    counts: dict[str, Counter] = {}
    for r in records:
        turns = r["conversations"]
        for q, a in zip(turns[::2], turns[1::2]):
            counts.setdefault(_question(q["value"]), Counter())[a["value"]] += 1
    rows = []
    for r in test:
        seen = counts.get(_question(r["conversations"][0]["value"]))
        pred = seen.most_common(1)[0][0] if seen else ""
        rows.append(EvalRow(r["id"], r["task"], question_kind(r), r["answer"], pred, score_answer(r["task"], pred, r["answer"])))
    return rows


def summarise(rows: list[EvalRow]) -> dict[str, float]:
    tasks = sorted({r.task for r in rows})
    out = {t: sum(r.correct for r in rows if r.task == t) / max(1, sum(r.task == t for r in rows)) for t in tasks}
    out["overall"] = sum(r.correct for r in rows) / max(1, len(rows))
    return out


def summarise_kinds(rows: list[EvalRow]) -> dict[str, float]:
    """Accuracy per question kind (word, bar, colour, count, shape)."""
    return {k: sum(r.correct for r in rows if r.kind == k) / n for k in KINDS if (n := sum(r.kind == k for r in rows))}


def kinds_table(kinds: dict[str, dict[str, float]], counts: dict[str, int]) -> str:
    lines = ["| question kind | items | vlmkit (with image) | blind baseline | prior baseline |", "|---|---:|---:|---:|---:|"]
    for k in (k for k in KINDS if k in counts):
        lines.append(f"| {k} | {counts[k]} | {kinds['vlmkit'][k]:.1%} | {kinds['blind'][k]:.1%} | {kinds['prior'][k]:.1%} |")
    return "\n".join(lines)


def results_table(trained: dict[str, float], blind: dict[str, float], prior: dict[str, float], counts: dict[str, int]) -> str:
    lines = [
        "| task | metric | items | vlmkit (with image) | blind baseline (same LLM, no image) | prior baseline (most common training answer) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for task in [t for t in trained if t != "overall"]:
        lines.append(f"| {task} | {METRIC_NAMES[task]} | {counts[task]} | {trained[task]:.1%} | {blind[task]:.1%} | {prior[task]:.1%} |")
    lines.append(f"| **overall** | mean over items | {sum(counts.values())} | **{trained['overall']:.1%}** | **{blind['overall']:.1%}** | **{prior['overall']:.1%}** |")
    return "\n".join(lines)


def run_quickstart(out_dir: str | Path = "runs/quickstart", device: str = "cpu", overrides: list[str] | tuple[str, ...] = (),
                   n_caption: int = 400, n_instruct: int = 600, n_test: int = 150, seed: int = 0, on_change: str = "refuse",
                   n_instruct_more: int = 1400, more_kinds: tuple[str, ...] = ("chart", "text", "chart", "scene")) -> dict:
    started = time.perf_counter()
    out = Path(out_dir)
    data_dir = out / "data"
    if not (data_dir / "test.json").is_file():
        # More stage-2 images than steps can repeat: a connector that sees each image a few times
        # memorises them (training loss 0.4, held-out at the prior) instead of learning to read.
        # Bar values are the hardest kind to learn (a frozen LLM has to tie "bar B" to a place in
        # the image), so half of the further images are charts.
        generate_data(data_dir, n_caption=n_caption, n_instruct=n_instruct, n_test=n_test, seed=seed, n_instruct_more=n_instruct_more,
                      more_kinds=more_kinds)
    config: Config = load_config(default_recipe(), [
        f"train.output_dir={out}", f"train.device={device}", f"train.seed={seed}", f"train.data_dir={data_dir}",
        *overrides,
    ])
    torch.manual_seed(seed)
    model, stages = run_training(config, on_change=on_change)
    model.eval()

    test = json.loads((data_dir / "test.json").read_text())
    bf16 = config.train.precision == "bf16"  # answer in the precision the model trained in
    trained_rows = answer_questions(model, test, data_dir, with_image=True, desc="eval with image", bf16=bf16)
    blind_rows = answer_questions(model, test, data_dir, with_image=False, desc="eval blind", bf16=bf16)
    prior_rows = prior_answers(json.loads((data_dir / "stage2.json").read_text()), test)
    trained, blind, prior = summarise(trained_rows), summarise(blind_rows), summarise(prior_rows)
    counts = {t: sum(r["task"] == t for r in test) for t in sorted({r["task"] for r in test})}
    kinds = {"vlmkit": summarise_kinds(trained_rows), "blind": summarise_kinds(blind_rows), "prior": summarise_kinds(prior_rows)}
    kind_counts = {k: n for k in KINDS if (n := sum(r.kind == k for r in trained_rows))}
    table = results_table(trained, blind, prior, counts) + "\n\n" + kinds_table(kinds, kind_counts)

    logger = JsonlLogger(out / "metrics.jsonl")
    logger.log({"event": "eval", "model": "vlmkit", **trained})
    logger.log({"event": "eval", "model": "blind", **blind})
    logger.log({"event": "eval", "model": "prior", **prior})
    logger.close()
    with open(out / "predictions.jsonl", "w") as f:
        for kind, rows in (("vlmkit", trained_rows), ("blind", blind_rows), ("prior", prior_rows)):
            for r in rows:
                f.write(json.dumps({"model": kind, **r.__dict__}) + "\n")
    metrics = read_jsonl(out / "metrics.jsonl")
    plot_losses(metrics, out / "loss.png", "vlmkit quickstart")
    plotted = plot_heldout(metrics, out / "heldout.png", "vlmkit quickstart: held-out accuracy per question kind", categories=KINDS)
    elapsed = time.perf_counter() - started
    summary = {"vlmkit": trained, "blind": blind, "prior": prior, "counts": counts, "kinds": kinds, "kind_counts": kind_counts,
               "seconds": elapsed, "heldout_eval_seconds": sum(s.eval_seconds for s in stages),
               "checkpoint": str(stages[-1].checkpoint), "stages": [{"name": s.name, "steps": s.steps, "seconds": s.seconds,
               "eval_seconds": s.eval_seconds, "final_loss": s.losses[-1] if s.losses else None,
               "trainable_parameters": s.trainable_parameters} for s in stages]}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "results.md", table + "\n")
    print("\n" + table)
    curves = f"loss curve {out / 'loss.png'}" + (f", held-out accuracy {out / 'heldout.png'}" if plotted else "")
    print(f"\nwall time {elapsed:.0f} s (held-out checks during training {summary['heldout_eval_seconds']:.0f} s); "
          f"checkpoint {summary['checkpoint']}; metrics {out / 'metrics.jsonl'}; {curves}")
    return summary
