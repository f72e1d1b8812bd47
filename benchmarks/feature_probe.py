"""Is the answer in the frozen image features? A linear probe on EfficientNet-Lite0 features.

For each synthetic quickstart question type, render images with known answers, encode them
with the frozen tower (exactly as the quickstart does), fit a logistic regression on 75% of
them and report held-out accuracy. A high probe accuracy with a low VLM accuracy means the
missing piece is training of the connector/LLM pathway, not the visual signal.

    python benchmarks/feature_probe.py [--n 600] [--size 224]
"""

from __future__ import annotations

import argparse
import json
import random

import torch
from sklearn.linear_model import LogisticRegression

from vlmkit.config import ProcessorConfig
from vlmkit.data.synthetic.render import COLOURS, SHAPES, WORDS, bar_chart, scene, word_image
from vlmkit.model.vision import EfficientNetLiteTower
from vlmkit.processing.fixed import FixedResizeProcessor


def tasks(rng: random.Random, n: int) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {"word": ([], []), "bar B value": ([], []), "colour": ([], []), "count": ([], []), "shape": ([], [])}
    for _ in range(n):
        w = rng.choice(WORDS)
        out["word"][0].append(word_image(rng, w))
        out["word"][1].append(w)
        values = [rng.randint(1, 9) for _ in range(3)]
        out["bar B value"][0].append(bar_chart(rng, ["A", "B", "C"], values))
        out["bar B value"][1].append(values[1])
        count, colour, shape = rng.randint(1, 4), rng.choice(list(COLOURS)), rng.choice(SHAPES)
        img = scene(rng, count, colour, shape)
        for name, label in (("colour", colour), ("count", count), ("shape", shape)):
            out[name][0].append(img)
            out[name][1].append(label)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args(argv)
    tower = EfficientNetLiteTower("efficientnet-lite0").eval()
    cfg = ProcessorConfig()
    proc = FixedResizeProcessor(args.size, tower.num_tokens(args.size), cfg.mean, cfg.std, fit="squash")
    split = int(args.n * 0.75)
    results = {}
    for name, (images, labels) in tasks(random.Random(0), args.n).items():
        with torch.no_grad():
            feats = torch.cat([tower(torch.cat([proc.preprocess(im).pixel_values for im in images[i : i + 64]]))
                               for i in range(0, len(images), 64)])
        X = feats.flatten(1).numpy()
        clf = LogisticRegression(max_iter=1000).fit(X[:split], labels[:split])
        results[name] = round(float(clf.score(X[split:], labels[split:])), 3)
        print(json.dumps({"task": name, "classes": len(set(labels)), "probe_accuracy": results[name]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
