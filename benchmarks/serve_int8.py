"""`vlmkit serve --quantize int8` against full precision: resident memory, batch-1 decoding speed,
and agreement of greedy answers on held-out questions, through the server's generation engine.

Each measurement runs in a fresh process (so resident memory is the model's own), full precision
and int8 interleaved, and the figures are medians over the repeats:
  rss_mb      resident memory after loading (and quantizing) and answering every question
  decode      batch-1 decoding, tokens/s, after a prompt with an image (a fixed number of steps)
  agreement   the share of held-out answers identical to full precision's (token for token)

    python benchmarks/serve_int8.py --checkpoint CKPT --data DATA/test.json    # the quickstart model
    python benchmarks/serve_int8.py --shape smollm2-135m --device cuda          # random weights
    python benchmarks/serve_int8.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import SHAPES, cpu_seconds, load_model


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory in MB (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def prompts(model, processor, data: str | None, limit: int):
    from PIL import Image

    from vlmkit.data.formats import Message
    from vlmkit.processing.images import load_image

    if data:
        records = json.loads(Path(data).read_text())[:limit]
        root = Path(data).parent
        return [processor.encode_prompt([Message("user", r["conversations"][0]["value"])], [load_image((root / r["image"]).read_bytes())])
                for r in records]
    size = model.config.processor.image_size
    return [processor.encode_prompt([Message("user", f"<image>\nQuestion {i}?")], [Image.new("RGB", (size, size), (20 * i % 256, 90, 160))])
            for i in range(limit)]


async def _answer(batcher, prompt_list, max_tokens: int) -> list[tuple[list[int], list[float]]]:
    from vlmkit.generate import GenerationConfig
    from vlmkit.serve.batching import Job

    loop = asyncio.get_running_loop()
    jobs = [Job(prompt=p, gen=GenerationConfig(max_new_tokens=max_tokens), max_new_tokens=max_tokens, loop=loop) for p in prompt_list]
    for job in jobs:
        batcher.submit(job)
    out = []
    for job in jobs:
        tokens, times = [], []
        while True:
            event = await job.events.get()
            if event.kind == "token":
                tokens.append(event.token)
                times.append(time.perf_counter())
            elif event.kind == "error":
                raise RuntimeError(event.reason)
            else:
                break
        out.append((tokens, times))
    return out


def child(args) -> dict:
    import torch

    from vlmkit.serve.engine import ContinuousBatcher

    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_model(args.checkpoint, args.shape, args.device)
    if args.mode == "int8":
        from vlmkit.serve.quantize import quantize_weights

        quantize_weights(model, "int8")
    batcher = ContinuousBatcher(model, max_batch=16)
    batcher.start()
    held_out = prompts(model, processor, args.data, args.items)
    answers = [t for t, _ in asyncio.run(_answer(batcher, held_out, args.max_tokens))] if args.answers else None
    # Decoding speed: one request at a time, a fixed number of steps (stop tokens ignored).
    batcher.stop_ids = set()
    speeds, cpu = [], []
    for _ in range(args.decode_repeats):
        c0 = cpu_seconds(os.getpid())
        (tokens, times), = asyncio.run(_answer(batcher, held_out[:1], args.decode_tokens))
        cpu.append(cpu_seconds(os.getpid()) - c0)
        speeds.append((len(tokens) - 1) / (times[-1] - times[0]))
    batcher.stop()
    current, peak = rss_mb()
    return {"mode": args.mode, "rss_mb": current, "peak_rss_mb": peak, "decode_tok_s": statistics.median(speeds),
            "decode_cpu_s": statistics.median(cpu), "answers": answers}


def run_child(args, mode: str, answers: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--shape", args.shape, "--device", args.device, "--items", str(args.items),
           "--max-tokens", str(args.max_tokens), "--decode-tokens", str(args.decode_tokens), "--threads", str(args.threads)]
    cmd += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    cmd += ["--data", args.data] if args.data else []
    cmd += ["--answers"] if answers else []
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--data", help="held-out LLaVA-style JSON (the quickstart's test.json)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--items", type=int, default=150)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-repeats", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each process (0: torch's default)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--answers", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.quick:
        args.shape, args.items, args.repeats, args.decode_tokens, args.decode_repeats = "tiny", min(args.items, 8), 1, 16, 3
    runs: dict[str, list[dict]] = {"fp32": [], "int8": []}
    for r in range(args.repeats):
        for mode in (["fp32", "int8"] if r % 2 == 0 else ["int8", "fp32"]):
            runs[mode].append(run_child(args, mode, answers=r == 0))
            last = runs[mode][-1]
            print(f"repeat {r + 1} {mode}: RSS {last['rss_mb']:.0f} MB, decode b1 {last['decode_tok_s']:.1f} tok/s", flush=True)
    full, int8 = runs["fp32"][0]["answers"], runs["int8"][0]["answers"]
    agree = sum(a == b for a, b in zip(full, int8)) / len(full)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("rss_mb", "peak_rss_mb", "decode_tok_s", "decode_cpu_s")} for m, rs in runs.items()}
    report = {"model": args.checkpoint or f"random {args.shape}", "device": args.device, "items": len(full), "repeats": args.repeats,
              "modes": med, "rss_reduction": 1 - med["int8"]["rss_mb"] / med["fp32"]["rss_mb"],
              "decode_speedup": med["int8"]["decode_tok_s"] / med["fp32"]["decode_tok_s"], "agreement": agree}
    print(f"{report['model']} on {args.device}, medians of {args.repeats} interleaved repeats, {len(full)} held-out questions")
    print("| weights | RSS MB | peak RSS MB | decode b1 tok/s | decode CPU s |\n|---|---|---|---|---|")
    for m, s in med.items():
        print(f"| {m} | {s['rss_mb']:.0f} | {s['peak_rss_mb']:.0f} | {s['decode_tok_s']:.1f} | {s['decode_cpu_s']:.2f} |")
    print(f"RSS {100 * report['rss_reduction']:.0f}% lower, decode {report['decode_speedup']:.2f}x, "
          f"{100 * agree:.1f}% of answers identical to full precision")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
