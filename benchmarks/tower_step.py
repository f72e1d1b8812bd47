"""What training the EfficientNet-Lite0 tower costs against its frozen forward, per batch of 8
256 px images under bf16 autocast, side by side in one run: the figure behind the stage-boundary
experiment's budget (src/vlmkit/recipes/lecture-claims/stages.yaml). Reports process CPU seconds
as well as wall seconds, since the first changes little when other jobs share the machine.

    .venv/bin/python benchmarks/tower_step.py [--threads 1] [--size 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> int:
    from vlmkit.config import VisionConfig
    from vlmkit.model.vision import build_efficientnet_lite0
    from vlmkit.paths import offline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    offline()
    torch.set_num_threads(args.threads)
    tower = build_efficientnet_lite0(VisionConfig(name="efficientnet-lite0"))
    x = torch.randn(8, 3, args.size, args.size)

    def frozen():
        tower.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            tower(x)

    def trained():
        tower.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tower(x)
        (out[0] if isinstance(out, tuple) else out).float().pow(2).mean().backward()

    times = {"frozen forward": [], "forward + backward": []}
    for _ in range(args.repeats):  # interleaved, so a change of load hits both alike
        times["frozen forward"].append(timed(frozen))
        times["forward + backward"].append(timed(trained))
    report = {name: {"wall_s": round(statistics.median(w for w, _ in t), 3), "cpu_s": round(statistics.median(c for _, c in t), 3)}
              for name, t in times.items()}
    print(json.dumps({"images": 8, "size": args.size, "threads": args.threads, **report}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
