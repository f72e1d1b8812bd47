"""Training input at scale: time to the first optimizer step, peak memory, and input-pipeline
throughput, on a generated LLaVA-style dataset of small JPEGs.

    PYTHONPATH=src python benchmarks/data_pipeline.py --sizes 10000 50000 200000 --out /tmp/dp

Each measurement runs in a fresh process (so peak RSS is its own): a one-step stage over the first
N records with the lazy pipeline, and with today's former eager path (every sample encoded before
step 1) at the sizes given to --eager. Then the input pipeline alone (no model step) with 0, 1 and
2 DataLoader workers. Prints one JSON line per measurement and a table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MODEL = {
    "vision": {"name": "hf-random", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "image_size": 32, "patch_size": 8}},
    "llm": {"name": "hf-random", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                            "num_attention_heads": 2, "num_key_value_heads": 1}},
    "processor": {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
}


def generate(folder: Path, n: int) -> Path:
    """n records, each with its own small JPEG (64 distinct pictures, written n times)."""
    from PIL import Image
    from tqdm import tqdm

    data = folder / f"data-{n}.json"
    if data.is_file():
        return data
    (folder / "images").mkdir(parents=True, exist_ok=True)
    blobs = []
    for k in range(64):
        buf = io.BytesIO()
        Image.new("RGB", (48, 40), ((k * 37) % 256, (k * 91) % 256, (k * 13) % 256)).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    records = []
    for i in tqdm(range(n), desc=f"generate {n}", unit="img", mininterval=2):
        name = f"images/{i // 1000:04d}/{i:07d}.jpg"
        path = folder / name
        if not path.is_file():
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(blobs[i % 64])
        records.append({"id": f"r{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is this picture?"},
            {"from": "gpt", "value": f"It is colour number {i % 64}."}]})
    data.write_text(json.dumps(records))
    return data


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_first_step(data: str, out: str, eager: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    from vlmkit.config import load_config
    from vlmkit.train.loop import run_training
    from vlmkit.utils import read_jsonl

    t0 = time.perf_counter()
    cfg = load_config({"model": MODEL, "train": {"output_dir": out, "feature_cache": False, "stages": {
        "s": {"data": data, "trainable": ["connector"], "lr": 1e-3, "batch_size": 8, "max_steps": 1}}}})
    if eager:
        # The former path: every sample encoded (pixels included) and kept before step 1.
        from vlmkit.data.formats import read_llava_records
        from vlmkit.model.vlm import VisionLanguageModel
        from vlmkit.processing import build_chat_processor
        from vlmkit.train.loop import encode_all

        model = VisionLanguageModel.build(cfg.model, pretrained=False)
        encoded, _ = encode_all(build_chat_processor(model, 512), read_llava_records(data), "error", "s")
        return {"seconds_to_encode_all": time.perf_counter() - t0, "peak_rss_mb": rss_mb(), "samples": len(encoded)}
    run_training(cfg, progress=False)
    first = read_jsonl(Path(out) / "metrics.jsonl")[0]
    return {"seconds_to_first_step": time.perf_counter() - t0, "step_elapsed_s": first["elapsed_s"], "peak_rss_mb": rss_mb()}


def child_throughput(data: str, workers: int, batches: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from vlmkit.config import load_config
    from vlmkit.data.pipeline import RankSampler, StageDataset, make_loader, receive
    from vlmkit.data.sources import Mixture, open_source
    from vlmkit.model.vlm import VisionLanguageModel
    from vlmkit.processing import build_chat_processor

    cfg = load_config({"model": MODEL})
    model = VisionLanguageModel.build(cfg.model, pretrained=False)
    mixture = Mixture([open_source(data)], [1.0], [data])
    dataset = StageDataset(mixture, build_chat_processor(model, 512), dpo=False, pad_id=model.tokenizer.pad_token_id or 0)
    it = iter(make_loader(dataset, RankSampler(mixture, 8, 0, "s"), workers, False, prefetch=4))
    receive(next(it))  # workers started
    t0 = time.perf_counter()
    n = sum(len(receive(next(it)).indices) for _ in range(batches))
    return {"workers": workers, "samples_per_s": n / (time.perf_counter() - t0)}


def run_child(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    ap.add_argument("--eager", type=int, nargs="*", default=[10_000], help="sizes at which to run the former eager path")
    ap.add_argument("--out", default="/tmp/vlmkit-data-pipeline")
    ap.add_argument("--batches", type=int, default=60, help="micro-batches of 8 timed per worker setting")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "first":
            print(json.dumps(child_first_step(rest[0], rest[1], rest[2] == "eager")))
        else:
            print(json.dumps(child_throughput(rest[0], int(rest[1]), int(rest[2]))))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in sorted(set(args.sizes) | set(args.eager)):
        data = generate(out, n)
        for mode in ["lazy"] + (["eager"] if n in args.eager else []):
            run_dir = out / f"run-{n}-{mode}-{time.time_ns()}"
            r = {"samples": n, "mode": mode, **run_child("first", str(data), str(run_dir), mode)}
            print(json.dumps(r), flush=True)
            rows.append(r)
    data = generate(out, min(args.sizes))
    for workers in (0, 1, 2):
        r = {"samples": min(args.sizes), "mode": "pipeline", **run_child("tp", str(data), str(workers), str(args.batches))}
        print(json.dumps(r), flush=True)
        rows.append(r)
    print("\n| samples | path | time to first step (s) | peak RSS (MB) |\n|---|---|---|---|")
    for r in rows:
        if r["mode"] == "lazy":
            print(f"| {r['samples']:,} | lazy | {r['seconds_to_first_step']:.1f} | {r['peak_rss_mb']:.0f} |")
        elif r["mode"] == "eager":
            print(f"| {r['samples']:,} | eager (encode all, before step 1) | {r['seconds_to_encode_all']:.1f} + step | {r['peak_rss_mb']:.0f} |")
    print("\n| workers | input pipeline samples/s |\n|---|---|")
    for r in rows:
        if r["mode"] == "pipeline":
            print(f"| {r['workers']} | {r['samples_per_s']:.0f} |")


if __name__ == "__main__":
    main()
