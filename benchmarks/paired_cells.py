"""Two cells of a `vlmkit ablate` sweep on the same held-out items: B minus A, overall and per
question kind, with the paired bootstrap interval and p-value `vlmkit eval compare` uses.

    python benchmarks/paired_cells.py SWEEP/cells/A/cell.json SWEEP/cells/B/cell.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlmkit.eval.stats import paired_test

GROUPS = {"all": None, "word": ("word",), "chart and table": ("bar-value", "tick", "cell"),
          "scenes": ("colour", "count", "shape")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell_a")
    parser.add_argument("cell_b")
    args = parser.parse_args()
    a = {i["id"]: i for i in json.loads(Path(args.cell_a).read_text(encoding="utf-8"))["items"]}
    b = {i["id"]: i for i in json.loads(Path(args.cell_b).read_text(encoding="utf-8"))["items"]}
    if sorted(a) != sorted(b):
        raise SystemExit("the two cells were scored on different held-out items")
    for name, kinds in GROUPS.items():
        ids = [i for i in sorted(a) if kinds is None or a[i]["kind"] in kinds]
        if not ids:
            continue
        t = paired_test([a[i]["correct"] for i in ids], [b[i]["correct"] for i in ids])
        lo, hi = t.ci
        print(f"{name}: {100 * t.mean_a:.1f}% -> {100 * t.mean_b:.1f}%, difference {100 * t.diff:+.1f} points "
              f"[{100 * lo:+.1f}, {100 * hi:+.1f}], p {t.p_value:.3f}, over {t.n_items} items")


if __name__ == "__main__":
    main()
