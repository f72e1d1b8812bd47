"""Training curves as PNG files, drawn from the lines of `metrics.jsonl`: the loss against the
step (`loss.png`), the held-out scores of `train.eval` against the step (`heldout.png`), and for a
GRPO stage the mean reward of its completions, with each weighted term (`reward.png`).

`vlmkit train` draws them for each stage into the stage's checkpoint folder when the stage ends;
`vlmkit quickstart` draws its stages together on one pair, the steps running on across stages.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from vlmkit.utils import read_jsonl


def _pyplot():
    # Imported when a plot is drawn, not when training starts: matplotlib takes a second to load.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _loss_lines(records: list[dict], stages: Iterable[str] | None) -> list[dict]:
    wanted = None if stages is None else set(stages)
    return [r for r in records if "loss" in r and "stage" in r and isinstance(r.get("step"), int)
            and (wanted is None or r["stage"] in wanted)]


def _stage_starts(losses: list[dict]) -> dict[str, int]:
    """Where each stage's step 1 falls on a run-long axis: steps count from 1 in each stage."""
    last: dict[str, int] = {}
    for r in losses:
        last[r["stage"]] = max(last.get(r["stage"], 0), r["step"])
    starts, offset = {}, 0
    for stage, n in last.items():
        starts[stage], offset = offset, offset + n
    return starts


def _save(fig, ax, out_png: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)


def plot_losses(records: list[dict], out_png: Path, title: str, stages: Iterable[str] | None = None) -> bool:
    """The training loss against the optimizer step, one line per stage (all stages, or those
    named); False, and no file, when there is no loss to draw."""
    losses = _loss_lines(records, stages)
    if not losses:
        return False
    plt = _pyplot()
    starts = _stage_starts(losses)
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        for stage, start in starts.items():
            points = [r for r in losses if r["stage"] == stage]
            ax.plot([start + r["step"] for r in points], [r["loss"] for r in points], label=f"stage {stage}")
        ax.set_xlabel("optimizer step" if len(starts) == 1 else "optimizer step (all stages)")
        ax.set_ylabel("training loss")
        ax.set_title(title)
        ax.legend()
        _save(fig, ax, out_png)
    finally:
        plt.close(fig)
    return True


def plot_heldout(records: list[dict], out_png: Path, title: str, stages: Iterable[str] | None = None,
                 categories: Iterable[str] | None = None) -> bool:
    """The held-out scores (`train.eval` lines) against the optimizer step: the overall score and
    each category of the benchmark's breakdown (those in `categories`, in that order; None: all,
    as they come). False, and no file, when no held-out check ran."""
    wanted = None if stages is None else set(stages)
    evals = [r for r in records if r.get("event") == "eval" and "stage" in r and isinstance(r.get("step"), int)
             and isinstance(r.get("overall"), (int, float)) and (wanted is None or r["stage"] in wanted)]
    if not evals:
        return False
    plt = _pyplot()
    starts = _stage_starts(_loss_lines(records, stages))
    x = [starts.get(r["stage"], 0) + r["step"] for r in evals]
    if categories is None:
        categories = dict.fromkeys(k for r in evals for k in r.get("breakdown") or {} if k)  # "": no category named
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        for key in categories:
            if any(key in (r.get("breakdown") or {}) for r in evals):
                ax.plot(x, [100 * (r.get("breakdown") or {}).get(key, float("nan")) for r in evals], marker="o", ms=3, label=key)
        ax.plot(x, [100 * r["overall"] for r in evals], color="black", lw=2, marker="o", ms=3, label="overall")
        for start in starts.values():
            if start:
                ax.axvline(start, color="grey", ls=":", lw=1)
        ax.set_xlabel("optimizer step" if len(starts) <= 1 else "optimizer step (all stages)")
        ax.set_ylabel(f"held-out {evals[-1].get('benchmark', 'score')}, % ({evals[-1].get('items', '?')} items)")
        ax.set_ylim(-2, 102)
        ax.set_title(title)
        ax.legend(ncol=3, fontsize=8)
        _save(fig, ax, out_png)
    finally:
        plt.close(fig)
    return True


def plot_rewards(records: list[dict], out_png: Path, title: str, stage: str) -> bool:
    """A GRPO stage's mean reward per step (a band of one std around it), and each reward term's
    mean where there are several; False, and no file, when the stage logged no reward."""
    rows = [r for r in _loss_lines(records, [stage]) if isinstance(r.get("reward"), (int, float))]
    if not rows:
        return False
    plt = _pyplot()
    x = [r["step"] for r in rows]
    mean = [r["reward"] for r in rows]
    std = [r.get("reward_std", 0.0) for r in rows]
    terms = [k for k in rows[-1] if k.startswith("rewards/") and k.endswith("/mean")]
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color="black", alpha=0.1)
        ax.plot(x, mean, color="black", lw=2, label="reward (weighted sum)")
        if len(terms) > 1:
            for key in terms:
                ax.plot(x, [r.get(key, float("nan")) for r in rows], lw=1, label=key[len("rewards/"):-len("/mean")])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("mean reward of the step's completions")
        ax.set_title(title)
        ax.legend(fontsize=8)
        _save(fig, ax, out_png)
    finally:
        plt.close(fig)
    return True


def plot_stage(metrics_path: Path, stage: str, folder: Path) -> list[Path]:
    """A stage's `loss.png`, `heldout.png` (when `train.eval` checked it) and `reward.png` (a GRPO
    stage) in `folder`; the paths written."""
    records = read_jsonl(metrics_path) if metrics_path.is_file() else []
    written = []
    if plot_losses(records, folder / "loss.png", f"stage {stage}: training loss", [stage]):
        written.append(folder / "loss.png")
    if plot_heldout(records, folder / "heldout.png", f"stage {stage}: held-out score", [stage]):
        written.append(folder / "heldout.png")
    if plot_rewards(records, folder / "reward.png", f"stage {stage}: reward", stage):
        written.append(folder / "reward.png")
    return written
