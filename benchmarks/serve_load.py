"""The server under load: N concurrent `openai`-client users on loopback, each asking several
questions about one of K images, against a real server process (uvicorn).

Two servers run in the same invocation, interleaved, each started fresh per repeat:
  "static":     --batching static --no-feature-cache --no-prefix-cache (the earlier server: a
                batch forms, decodes to its end; every image is encoded every time)
  "continuous": the defaults (continuous batching, image-feature cache, prefix cache)
Every request streams; time to first token is the first content chunk, latency the whole answer.
Reported per server: requests/s, answer tokens/s, p50 and p95 TTFT and latency (medians over the
repeats), and the server process's CPU seconds (user+sys); then the ratios.

    python benchmarks/serve_load.py --checkpoint CKPT --data DATA/test.json     # the quickstart model
    python benchmarks/serve_load.py --shape smollm2-135m --device cuda          # random weights
    python benchmarks/serve_load.py --quick                                     # tiny, seconds
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

SHAPES = {
    "tiny": {"vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
             "llm": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048}},
    "smollm2-135m": {"vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 224, "patch_size": 16},
                     "llm": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                             "max_position_embeddings": 8192, "tie_word_embeddings": True}},
}
SERVERS = {
    "static": {"batching": "static", "feature_cache_mb": 0, "prefix_cache_mb": 0},
    "continuous": {},
}
QUESTIONS = ["What is in the image?", "How many shapes are there? Answer with a number.", "What colour is the largest shape?",
             "Describe the picture in one sentence.", "Is there text in the image?", "What shape is on the left?"]
SYSTEM = "You are a helpful assistant that answers questions about images briefly."


def load_model(checkpoint: str | None, shape: str, device: str):
    """(model, processor): a checkpoint, or random weights of a named shape."""
    import torch

    from vlmkit.processing import build_chat_processor

    if checkpoint:
        from vlmkit.checkpoint import load_checkpoint

        model, config = load_checkpoint(checkpoint, device=device)
        return model.eval(), build_chat_processor(model, config.train.max_length)
    from vlmkit.config import load_config
    from vlmkit.model.vlm import VisionLanguageModel

    spec = SHAPES[shape]
    torch.manual_seed(0)
    size = spec["vision"]["image_size"]
    cfg = load_config({"model": {
        "vision": {"name": "hf-random", "model_type": "siglip_vision_model", "config": spec["vision"]},
        "llm": {"name": "hf-random", "config": spec["llm"]},
        "processor": {"image_size": size, "mean": [0.5] * 3, "std": [0.5] * 3},
    }})
    model = VisionLanguageModel.build(cfg.model, pretrained=False).to(device).eval()
    with torch.no_grad():  # sharper logits than random init: greedy paths not decided by float noise
        model.llm.get_output_embeddings().weight.mul_(8)
    return model, build_chat_processor(model, 1024)


def serve_child(args) -> None:
    """The server process: the model behind uvicorn on a port it writes to --port-file."""
    from vlmkit.serve.app import ServerSettings, create_app, run_server

    model, processor = load_model(args.checkpoint, args.shape, args.device)
    if args.quantize:
        from vlmkit.serve.quantize import quantize_weights

        quantize_weights(model, args.quantize)
    settings = ServerSettings(model_name="bench", max_tokens_limit=1024, **json.loads(args.settings))
    sock = socket.create_server(("127.0.0.1", 0))
    Path(args.port_file).write_text(str(sock.getsockname()[1]))
    run_server(create_app(model, processor, settings), port=sock.getsockname()[1], sock=sock, log_level="warning")


def cpu_seconds(pid: int) -> float:
    """user+sys CPU seconds of a process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


class Server:
    def __init__(self, args, name: str, workdir: Path):
        port_file = workdir / f"port-{name}"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--child", "--settings", json.dumps(SERVERS[name]), "--port-file", str(port_file),
               "--shape", args.shape, "--device", args.device]
        if args.checkpoint:
            cmd += ["--checkpoint", args.checkpoint]
        if args.quantize:
            cmd += ["--quantize", args.quantize]
        self.proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {name} server exited with {self.proc.returncode}")
            if port_file.exists() and port_file.read_text():
                self.base = f"http://127.0.0.1:{port_file.read_text()}"
                try:
                    urllib.request.urlopen(self.base + "/health", timeout=5).read()
                    break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {name} server did not start")
            time.sleep(0.2)

    def health(self) -> dict:
        return json.loads(urllib.request.urlopen(self.base + "/health", timeout=10).read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def workload(args) -> list[tuple[str, list[str]]]:
    """Per user: its image (a data URI, one of K) and its questions."""
    rng = random.Random(0)
    images, questions = _images_and_questions(args)
    users = []
    for u in range(args.users):
        image = images[u % len(images)]
        users.append((image, [questions[(u + q) % len(questions)] for q in range(args.questions)]))
    rng.shuffle(users)
    return users


def _images_and_questions(args) -> tuple[list[str], list[str]]:
    if args.data:
        records = json.loads(Path(args.data).read_text())
        root = Path(args.data).parent
        paths = list(dict.fromkeys(r["image"] for r in records))[: args.images]
        uris = ["data:image/png;base64," + base64.b64encode((root / p).read_bytes()).decode() for p in paths]
        texts = list(dict.fromkeys(r["conversations"][0]["value"].replace("<image>", "").strip() for r in records))
        return uris, texts
    from PIL import Image

    uris = []
    for k in range(args.images):
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), ((60 * k) % 256, 200 - 40 * k, 30 + 50 * k)).save(buf, format="PNG")
        uris.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return uris, QUESTIONS


def run_users(base: str, users, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
    ttft, latency, tokens, errors = [], [], [0], []
    lock = threading.Lock()
    start = threading.Barrier(len(users) + 1)

    def user(image: str, questions: list[str]) -> None:
        start.wait()
        for q in questions:
            messages = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": q}]}]
            t0 = time.perf_counter()
            first, count = None, 0
            try:
                stream = client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens, temperature=0,
                                                        stream=True, stream_options={"include_usage": True})
                for chunk in stream:
                    if first is None and chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
                        first = time.perf_counter() - t0
                    if chunk.usage is not None:
                        count = chunk.usage.completion_tokens
            except Exception as e:  # noqa: BLE001 - counted and reported, the load goes on
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                ttft.append(first if first is not None else time.perf_counter() - t0)
                latency.append(time.perf_counter() - t0)
                tokens[0] += count

    threads = [threading.Thread(target=user, args=u) for u in users]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"requests": len(latency), "errors": len(errors), "wall_s": wall, "req_per_s": len(latency) / wall,
            "tok_per_s": tokens[0] / wall, "ttft_p50": _pct(ttft, 50), "ttft_p95": _pct(ttft, 95),
            "latency_p50": _pct(latency, 50), "latency_p95": _pct(latency, 95), "first_error": errors[0] if errors else None}


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def one_run(args, name: str, users, workdir: Path) -> dict:
    server = Server(args, name, workdir)
    try:
        run_users(server.base, users[:2], args.max_tokens)  # warm-up: first-call costs, not load
        cpu0 = cpu_seconds(server.proc.pid)
        result = run_users(server.base, users, args.max_tokens)
        result["server_cpu_s"] = cpu_seconds(server.proc.pid) - cpu0
        result["health"] = server.health()
    finally:
        server.stop()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a vlmkit checkpoint (default: random weights of --shape)")
    ap.add_argument("--data", help="a LLaVA-style JSON whose images and questions to use (default: generated)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--questions", type=int, default=3, help="questions each user asks, one after another")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quantize", choices=["int8"], help="serve both servers with int8 weights")
    ap.add_argument("--quick", action="store_true", help="tiny random model, 8 users, 1 repeat (a smoke run)")
    ap.add_argument("--json", help="append the results as one JSON line to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--settings", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--port-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        serve_child(args)
        return 0
    if args.quick:
        args.shape, args.users, args.repeats, args.questions = "tiny", min(args.users, 8), 1, 2
    import tempfile

    users = workload(args)
    runs: dict[str, list[dict]] = {name: [] for name in SERVERS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = list(SERVERS) if r % 2 == 0 else list(reversed(SERVERS))  # interleaved, alternating
            for name in order:
                runs[name].append(one_run(args, name, users, Path(tmp)))
                print(f"repeat {r + 1} {name}: {_line(runs[name][-1])}", flush=True)
    summary = {name: _median(results) for name, results in runs.items()}
    report = {"users": args.users, "images": args.images, "questions": args.questions, "max_tokens": args.max_tokens,
              "repeats": args.repeats, "device": args.device, "model": args.checkpoint or f"random {args.shape}",
              "quantize": args.quantize, "servers": summary,
              "throughput_ratio": summary["continuous"]["req_per_s"] / summary["static"]["req_per_s"],
              "p95_latency_ratio": summary["continuous"]["latency_p95"] / summary["static"]["latency_p95"],
              "caches": runs["continuous"][-1]["health"]}
    print(_table(report))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(report) + "\n")
    return 0 if all(s["errors"] == 0 for s in summary.values()) else 1


def _median(results: list[dict]) -> dict:
    keys = ["requests", "errors", "wall_s", "req_per_s", "tok_per_s", "ttft_p50", "ttft_p95", "latency_p50", "latency_p95", "server_cpu_s"]
    return {k: statistics.median(r[k] for r in results) for k in keys}


def _line(r: dict) -> str:
    return (f"{r['req_per_s']:.2f} req/s, {r['tok_per_s']:.1f} tok/s, TTFT p50 {r['ttft_p50']:.2f}s p95 {r['ttft_p95']:.2f}s, "
            f"latency p50 {r['latency_p50']:.2f}s p95 {r['latency_p95']:.2f}s, server CPU {r['server_cpu_s']:.1f}s, errors {r['errors']}")


def _table(report: dict) -> str:
    rows = [(f"{report['users']} users x {report['questions']} questions, {report['images']} images, max_tokens {report['max_tokens']}, "
             f"{report['model']} on {report['device']}, medians of {report['repeats']} interleaved repeats"),
            "| server | req/s | tok/s | TTFT p50 | TTFT p95 | latency p50 | latency p95 | server CPU s |",
            "|---|---|---|---|---|---|---|---|"]
    for name, s in report["servers"].items():
        rows.append(f"| {name} | {s['req_per_s']:.2f} | {s['tok_per_s']:.1f} | {s['ttft_p50']:.2f} | {s['ttft_p95']:.2f} | "
                    f"{s['latency_p50']:.2f} | {s['latency_p95']:.2f} | {s['server_cpu_s']:.1f} |")
    rows.append(f"throughput {report['throughput_ratio']:.2f}x, p95 latency {report['p95_latency_ratio']:.2f}x of static")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
