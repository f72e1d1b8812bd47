"""`vlmkit quickstart`: a real small VLM from packaged pretrained parts, trained through stages
1-2 on built-in synthetic data, then evaluated against a blind baseline.

1. Generate the synthetic dataset (captions; chart, text and scene questions; held-out split).
2. Train stage 1 (connector only) and stage 2 (connector + LLM, answer-only loss).
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
from vlmkit.eval.metrics import ocrbench_correct, relaxed_correctness, vqa_normalize
from vlmkit.utils import JsonlLogger, atomic_write_text, read_jsonl


def default_recipe() -> Path:
    return Path(str(resources.files("vlmkit") / "recipes" / "quickstart.yaml"))


def _score(task: str, prediction: str, answer: str) -> bool:
    if task == "chart":
        return relaxed_correctness(answer, prediction)
    if task == "text":
        return ocrbench_correct(prediction, answer, "IIIT5K")  # a "Text Recognition" dataset rule
    return vqa_normalize(prediction) == vqa_normalize(answer)


METRIC_NAMES = {
    "chart": "ChartQA relaxed accuracy",
    "text": "OCRBench matching rule",
    "scene": "VQA-normalised exact match",
}


@dataclass
class EvalRow:
    id: str
    task: str
    answer: str
    prediction: str
    correct: bool


def answer_questions(model, records: list[dict], image_root: Path, with_image: bool, batch_size: int = 16, max_new_tokens: int = 8, desc: str = "") -> list[EvalRow]:
    """Greedy answers through the same backend `vlmkit eval run` uses; blind runs drop the image."""
    from vlmkit.eval.backends import VlmkitBackend
    from vlmkit.processing.images import load_image

    backend = VlmkitBackend(model)
    rows: list[EvalRow] = []
    for start in tqdm(range(0, len(records), batch_size), desc=desc, unit="batch"):
        chunk = records[start : start + batch_size]
        requests = []
        for r in chunk:
            question = r["conversations"][0]["value"].replace("<image>", "").strip()
            requests.append((question, [load_image(image_root / r["image"])] if with_image else []))
        for r, pred in zip(chunk, backend.generate(requests, max_new_tokens)):
            rows.append(EvalRow(r["id"], r["task"], r["answer"], pred, _score(r["task"], pred, r["answer"])))
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
        rows.append(EvalRow(r["id"], r["task"], r["answer"], pred, _score(r["task"], pred, r["answer"])))
    return rows


def summarise(rows: list[EvalRow]) -> dict[str, float]:
    tasks = sorted({r.task for r in rows})
    out = {t: sum(r.correct for r in rows if r.task == t) / max(1, sum(r.task == t for r in rows)) for t in tasks}
    out["overall"] = sum(r.correct for r in rows) / max(1, len(rows))
    return out


def results_table(trained: dict[str, float], blind: dict[str, float], prior: dict[str, float], counts: dict[str, int]) -> str:
    lines = [
        "| task | metric | items | vlmkit (with image) | blind baseline (same LLM, no image) | prior baseline (most common training answer) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for task in [t for t in trained if t != "overall"]:
        lines.append(f"| {task} | {METRIC_NAMES[task]} | {counts[task]} | {trained[task]:.1%} | {blind[task]:.1%} | {prior[task]:.1%} |")
    lines.append(f"| **overall** | mean over items | {sum(counts.values())} | **{trained['overall']:.1%}** | **{blind['overall']:.1%}** | **{prior['overall']:.1%}** |")
    return "\n".join(lines)


def plot_losses(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_jsonl(metrics_path) if "loss" in r and "stage" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for stage in dict.fromkeys(r["stage"] for r in records):
        pts = [r for r in records if r["stage"] == stage]
        ax.plot([offset + r["step"] for r in pts], [r["loss"] for r in pts], label=f"stage {stage}")
        offset += max(r["step"] for r in pts)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (supervised tokens)")
    ax.set_title("vlmkit quickstart")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def run_quickstart(out_dir: str | Path = "runs/quickstart", device: str = "cpu", overrides: list[str] | tuple[str, ...] = (),
                   n_caption: int = 400, n_instruct: int = 600, n_test: int = 150, seed: int = 0, on_change: str = "refuse") -> dict:
    from vlmkit.data.synthetic.tasks import generate as generate_data
    from vlmkit.train.loop import run_training

    started = time.perf_counter()
    out = Path(out_dir)
    data_dir = out / "data"
    if not (data_dir / "test.json").is_file():
        generate_data(data_dir, n_caption=n_caption, n_instruct=n_instruct, n_test=n_test, seed=seed)
    config: Config = load_config(default_recipe(), [
        f"train.output_dir={out}", f"train.device={device}", f"train.seed={seed}",
        f"train.stages.align.data={data_dir / 'stage1.json'}",
        f"train.stages.instruct.data={data_dir / 'stage2.json'}",
        *overrides,
    ])
    torch.manual_seed(seed)
    model, stages = run_training(config, on_change=on_change)
    model.eval()

    test = json.loads((data_dir / "test.json").read_text())
    trained_rows = answer_questions(model, test, data_dir, with_image=True, desc="eval with image")
    blind_rows = answer_questions(model, test, data_dir, with_image=False, desc="eval blind")
    prior_rows = prior_answers(json.loads((data_dir / "stage2.json").read_text()), test)
    trained, blind, prior = summarise(trained_rows), summarise(blind_rows), summarise(prior_rows)
    counts = {t: sum(r["task"] == t for r in test) for t in sorted({r["task"] for r in test})}
    table = results_table(trained, blind, prior, counts)

    logger = JsonlLogger(out / "metrics.jsonl")
    logger.log({"event": "eval", "model": "vlmkit", **trained})
    logger.log({"event": "eval", "model": "blind", **blind})
    logger.log({"event": "eval", "model": "prior", **prior})
    logger.close()
    with open(out / "predictions.jsonl", "w") as f:
        for kind, rows in (("vlmkit", trained_rows), ("blind", blind_rows), ("prior", prior_rows)):
            for r in rows:
                f.write(json.dumps({"model": kind, **r.__dict__}) + "\n")
    plot_losses(out / "metrics.jsonl", out / "loss.png")
    elapsed = time.perf_counter() - started
    summary = {"vlmkit": trained, "blind": blind, "prior": prior, "counts": counts, "seconds": elapsed,
               "checkpoint": str(stages[-1].checkpoint), "stages": [{"name": s.name, "steps": s.steps, "seconds": s.seconds,
               "final_loss": s.losses[-1] if s.losses else None, "trainable_parameters": s.trainable_parameters} for s in stages]}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "results.md", table + "\n")
    print("\n" + table)
    print(f"\nwall time {elapsed:.0f} s; checkpoint {summary['checkpoint']}; metrics {out / 'metrics.jsonl'}; loss curve {out / 'loss.png'}")
    return summary
