"""What the quickstart's frozen-tower features cost per image, side by side in one run: EfficientNet-Lite0
at 256 px in fp32 and under bf16 autocast, in tower calls of 8 and of 32 images. The training loop
computes features for the feature cache under the stage's precision, 8 images per call
(`FrozenFeatures.CHUNK`); before, it ran fp32 on the whole micro-batch.

    .venv/bin/python benchmarks/frozen_features.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import yaml


def main(argv=None) -> int:
    from vlmkit.config import load_config
    from vlmkit.model.vlm import VisionLanguageModel
    from vlmkit.paths import offline
    from vlmkit.quickstart import default_recipe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    offline()
    torch.set_num_threads(args.threads)
    model = VisionLanguageModel.build(load_config({"model": yaml.safe_load(default_recipe().read_text())["model"]}).model)
    tower = model.vision.eval()
    size = model.config.processor.image_size
    results = {}
    for per_call in (32, 8):
        for bf16 in (False, True):
            x = torch.randn(per_call, 3, size, size)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                tower(x)  # warm-up
                start = time.perf_counter()
                for _ in range(args.repeats):
                    tower(x)
            ms = (time.perf_counter() - start) / (args.repeats * per_call) * 1000
            results[f"{'bf16' if bf16 else 'fp32'}, {per_call} per call"] = ms
    first = results["fp32, 32 per call"]
    for name, ms in results.items():
        print(json.dumps({"variant": name, "ms_per_image": round(ms, 1), "speed-up": round(first / ms, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
