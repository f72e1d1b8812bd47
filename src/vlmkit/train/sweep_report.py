"""A sweep's reports: one row per cell (its values, seeds pooled), accuracy per question kind with
a 95% bootstrap interval, and the cost side (visual tokens, prefill FLOPs, trainable parameters,
training time), as `ablation.json`, `ablation.md` and `accuracy_vs_tokens.png`; and every row
against a baseline row on the same held-out items (the paired difference per question kind, its
interval and p-value), since two rows' separate intervals can overlap while their paired
difference is clear.

Seeds are pooled per held-out item: an item's score is its mean over the seeds, and each
bootstrap resample draws held-out items (with all their seeds). The items are the unit that was
drawn; resampling (item, seed) pairs as if independent would count each item once per seed and
make the interval too narrow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlmkit.eval import stats
from vlmkit.utils import atomic_write_text

ERROR_BARS = {"method": "percentile bootstrap over held-out items; an item's score is its mean over the seeds",
              "level": stats.LEVEL, "resamples": stats.N_RESAMPLES, "seed": stats.SEED}


def pooled_by_item(cells: list[dict]) -> dict[str, tuple[dict, float]]:
    """item id -> (the item as first answered, for its kind and difficulty; its score averaged
    over the cells (seeds) that answered it), in the order the items first appear."""
    items: dict[str, dict] = {}
    scores: dict[str, list[float]] = {}
    for cell in cells:
        for it in cell["items"]:
            items.setdefault(it["id"], it)
            scores.setdefault(it["id"], []).append(float(it["correct"]))
    return {i: (items[i], sum(v) / len(v)) for i, v in scores.items()}


def pooled_scores(cells: list[dict], select) -> np.ndarray:
    """Each held-out item's mean score over the cells (seeds) that answered it, for the items `select` keeps."""
    return np.array([score for it, score in pooled_by_item(cells).values() if select(it)], dtype=np.float64)


def interval(cells: list[dict], select) -> dict:
    values = pooled_scores(cells, select)
    lo, hi = stats.bootstrap_ci(values) if len(values) else (0.0, 0.0)
    return {"mean": float(values.mean()) if len(values) else None, "ci": [lo, hi], "items": len(values)}


def _order(cells: list[dict], key) -> list[str]:
    seen: dict[str, None] = {}
    for cell in cells:
        for it in cell["items"]:
            if key(it) is not None:
                seen.setdefault(key(it))
    return list(seen)


def aggregate(cells: list[dict]) -> list[dict]:
    """One row per group of cells that differ only in their seed, in the cells' order."""
    rows = []
    for group, members in _by_group(cells).items():
        kinds = _order(members, lambda it: it["kind"])
        graded = _order(members, lambda it: None if it.get("difficulty") is None else f"{it['kind']}/{it['difficulty']}")
        first = members[0]
        rows.append({
            "group": group, "values": first["values"], "seeds": [c["seed"] for c in members],
            "accuracy": {k: interval(members, lambda it, k=k: it["kind"] == k) for k in kinds},
            "accuracy_by_difficulty": {g: interval(members, lambda it, g=g: it.get("difficulty") is not None
                                                   and f"{it['kind']}/{it['difficulty']}" == g) for g in graded},
            "overall": interval(members, lambda it: True),
            "visual_tokens": first["visual_tokens"], "memory_tokens": first["memory_tokens"],
            "prefill_gflops": _gflops(first["prefill_flops"]),
            "trainable_parameters": first["trainable_parameters"],
            "train_seconds": _mean(c["train_seconds"] for c in members),
            "train_cpu_seconds": _mean(c["train_cpu_seconds"] for c in members),
            "dropped_stages": first.get("dropped_stages", []),
        })
    return rows


def _by_group(cells: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for cell in cells:
        groups.setdefault(cell["group"], []).append(cell)
    return groups


def baseline_values(definition: dict, chosen: dict[str, str] | None = None) -> dict[str, str]:
    """The values of the row the others are compared against: the first value of every varied key,
    or the values in `chosen` (a key left out keeps its first value). Checked before a sweep trains."""
    values = {a["key"]: [str(v) for v in a["values"]] for a in definition["vary"]}
    want = {k: v[0] for k, v in values.items()}
    for key, value in (chosen or {}).items():
        if key not in values:
            raise ValueError(f"--baseline {key}={value}: {key} is not a varied key (varied: {', '.join(values) or 'none'})")
        if str(value) not in values[key]:
            raise ValueError(f"--baseline {key}={value}: not one of its values ({', '.join(values[key])})")
        want[key] = str(value)
    return want


def baseline_group(definition: dict, rows: list[dict], chosen: dict[str, str] | None = None) -> str:
    want = baseline_values(definition, chosen)
    for row in rows:
        if {k: str(v) for k, v in row["values"].items()} == want:
            return row["group"]
    raise ValueError("the baseline " + ", ".join(f"{k}={v}" for k, v in want.items()) + " is not a row of this sweep")


def comparisons(cells: list[dict], base: str) -> list[dict]:
    """Each other row minus the baseline row, overall and per question kind, on the items both
    answered (seeds pooled per item), with `stats.paired_test`'s bootstrap interval and p-value."""
    groups = _by_group(cells)
    reference = pooled_by_item(groups[base])
    out = []
    for group, members in groups.items():
        if group == base:
            continue
        other = pooled_by_item(members)
        common = [i for i in reference if i in other]
        kinds = list(dict.fromkeys(reference[i][0]["kind"] for i in common))
        entry = {"group": group, "against": base, "values": members[0]["values"], "difference": {}}
        for kind in [None, *kinds]:
            ids = [i for i in common if kind is None or reference[i][0]["kind"] == kind]
            t = stats.paired_test([reference[i][1] for i in ids], [other[i][1] for i in ids])
            entry["difference"]["overall" if kind is None else kind] = {
                "baseline": t.mean_a, "row": t.mean_b, "difference": t.diff, "ci": list(t.ci), "p_value": t.p_value,
                "items": t.n_items}
        out.append(entry)
    return out


def comparison_table(definition: dict, compared: list[dict]) -> str:
    """Markdown: each row minus the baseline, in points, with the paired 95% CI and p-value."""
    if not compared:
        return ""
    keys = [a["key"] for a in definition["vary"]]
    kinds = list(dict.fromkeys(k for c in compared for k in c["difference"]))
    head = [*keys, *(f"{k}: difference [95% CI], p" for k in kinds)]
    intro = (f"Against {compared[0]['against']} on the same held-out items (percentage points; paired bootstrap "
             "over items, seeds pooled per item):")
    lines = [intro, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in compared:
        diffs = []
        for k in kinds:
            d = c["difference"].get(k)
            diffs.append("-" if d is None else f"{100 * d['difference']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}], "
                         f"p {d['p_value']:.2f}")
        lines.append("| " + " | ".join([*(str(c["values"][k]) for k in keys), *diffs]) + " |")
    return "\n".join(lines)


def _gflops(flops: dict) -> float | None:
    total = flops.get("total")
    return None if total is None else round(total / 1e9, 3)


def _mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 1)


def _params(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _acc(entry: dict | None) -> str:
    if not entry or entry["mean"] is None:
        return "-"
    lo, hi = entry["ci"]
    return f"{entry['mean']:.1%} [{lo:.1%}, {hi:.1%}]"


def table(definition: dict, rows: list[dict]) -> str:
    """Markdown: one row per cell (seeds pooled)."""
    keys = [a["key"] for a in definition["vary"]]
    kinds = list(dict.fromkeys(k for r in rows for k in r["accuracy"]))
    head = [*keys, "seeds", *(f"{k} acc [95% CI]" for k in kinds), "visual tokens", "prefill GFLOPs", "trainable params", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        tokens = f"{r['visual_tokens']} / {r['memory_tokens']}" if r["memory_tokens"] else str(r["visual_tokens"])
        gflops = "-" if r["prefill_gflops"] is None else f"{r['prefill_gflops']:.2f}"
        cells = [*(str(r["values"][k]) for k in keys), ",".join(map(str, r["seeds"])), *(_acc(r["accuracy"].get(k)) for k in kinds),
                 tokens, gflops, _params(r["trainable_parameters"]), f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{r['group']}: stages {', '.join(r['dropped_stages'])} left out (embed-align writes prefix slots, which "
             "cross-attention fusion does not read)" for r in rows if r["dropped_stages"]]
    ci = f"95% CI: {ERROR_BARS['method']} ({ERROR_BARS['resamples']} resamples). Visual tokens: in the LLM context / cross-attention memory."
    return "\n".join([*lines, "", ci, *(f"- {n}" for n in notes)])


def _label(row: dict) -> str:
    return ", ".join(str(v) for v in row["values"].values()) or "base"


def plot(rows: list[dict], out_png: Path, title: str = "accuracy against visual tokens") -> bool:
    """Per question kind, accuracy against visual tokens per image, with CI bars; one marker per cell."""
    from vlmkit.train.plots import _pyplot

    kinds = list(dict.fromkeys(k for r in rows for k in r["accuracy"]))
    if not kinds:
        return False
    plt = _pyplot()
    cols = min(3, len(kinds))
    rows_n = -(-len(kinds) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.6 * rows_n), squeeze=False, sharey=True)
    for ax in axes.flat[len(kinds):]:
        ax.set_visible(False)
    markers = "osD^v<>PX*hp"
    for ax, kind in zip(axes.flat, kinds):
        for i, r in enumerate(rows):
            entry = r["accuracy"].get(kind)
            if not entry or entry["mean"] is None:
                continue
            x, y = max(r["visual_tokens"], 1), entry["mean"]
            err = [[max(0.0, y - entry["ci"][0])], [max(0.0, entry["ci"][1] - y)]]
            ax.errorbar([x], [y], yerr=err, fmt=markers[i % len(markers)], capsize=3, label=_label(r))
            ax.annotate(_label(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_title(kind)
        ax.set_xlabel("visual tokens per image")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("held-out accuracy (95% CI)")
    fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    partial = out_png.with_name(out_png.name + ".partial.png")
    fig.savefig(partial, dpi=110)
    plt.close(fig)
    partial.replace(out_png)
    return True


def write_reports(definition: dict, cells: list[dict], out: Path, baseline: dict[str, str] | None = None) -> dict:
    """`ablation.json` (definition, cells without their per-item rows, rows, comparisons against the
    baseline row), `ablation.md`, the plot."""
    rows = aggregate(cells)
    compared = comparisons(cells, baseline_group(definition, rows, baseline)) if len(rows) > 1 else []
    report = {"definition": definition, "error_bars": ERROR_BARS,
              "cells": [{k: v for k, v in c.items() if k != "items"} for c in cells], "rows": rows,
              "comparisons": compared}
    atomic_write_text(out / "ablation.json", json.dumps(report, indent=2) + "\n")
    markdown = table(definition, rows) + ("\n\n" + comparison_table(definition, compared) if compared else "")
    atomic_write_text(out / "ablation.md", markdown + "\n")
    plot(rows, out / "accuracy_vs_tokens.png")
    return report
