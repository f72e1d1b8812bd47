"""Batched against one-by-one generation speed for `vlmkit eval run`, any model behind BACKENDS.

    python benchmarks/eval_batching.py --model hf:/path/to/vlm --benchmark chartqa --n 64
    python benchmarks/eval_batching.py --model vlmkit:/path/to/checkpoint      # once that backend exists
    python benchmarks/eval_batching.py --model tiny-hf                          # random tiny LLaVA smoke run

Same model, same items, same prompts: the only difference is the batch size handed to
`Backend.generate`. Data defaults to a synthetic benchmark (`vlmkit data synth-bench`).
Prints one JSON line with samples/s for each batch size and whether the answers agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


# `compare_backends`' default model: a LLaVA the size of the lecture's small CPU examples
# (4-layer CLIP at 112 px = 64 visual tokens, a 256-wide 4-layer Llama).
EVAL_SHAPE = {"vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                         "image_size": 112, "patch_size": 14},
              "text": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8,
                       "num_key_value_heads": 4}}


def make_tiny_hf_llava(out: Path, seed: int = 0, shape: dict | None = None, sharpen: bool = False) -> Path:
    """A randomly initialised LLaVA (1-layer CLIP + 1-layer Llama unless `shape` names the
    "vision" and "text" config fields) with a word-level tokenizer, saved as a Hugging Face
    folder; only for exercising the HF backend offline."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": 4}
    for w in ("user assistant : the a what is of value which category has highest answer question using single "
              "word or phrase yes no one two three").split():
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %}assistant : {% endif %}")
    import warnings

    shape = shape or {"vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                 "image_size": 28, "patch_size": 14},
                      "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "num_key_value_heads": 2}}
    size, patch = shape["vision"]["image_size"], shape["vision"]["patch_size"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ip = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                          chat_template=template, num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**shape["vision"]),
        text_config=LlamaConfig(vocab_size=len(vocab), **shape["text"], max_position_embeddings=1024,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_index=4, vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    if sharpen:
        with torch.no_grad():  # random init is near-uniform: sharper logits leave no near-ties for greedy to split
            model.lm_head.weight.mul_(8)
            # A logit of 0 for the image token: `vlmkit export-hf` suppresses it in transformers'
            # generation config, and vlmkit's generate decodes it as text, so it must not win.
            model.lm_head.weight[cfg.image_token_index] = 0.0
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def _run_eval(backend, bench, items, out_dir: Path, batch_size: int, max_new_tokens: int) -> tuple[float, float, dict[str, str]]:
    """One `vlmkit eval run` through the runner (a fresh output folder, so nothing is reused):
    wall seconds, process CPU seconds and the predictions by item id."""
    from vlmkit.eval.runner import CACHE_NAME, run_benchmark

    wall, cpu = time.perf_counter(), time.process_time()
    outcome = run_benchmark(bench, items, backend, out_dir, model_spec=backend.name, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert outcome.generated == len(items) and outcome.reused == 0
    rows = [json.loads(line) for line in (out_dir / CACHE_NAME).read_text().splitlines() if line.strip()]
    return wall, cpu, {r["id"]: r["prediction"] for r in rows}


def compare_backends(root: Path, *, n: int = 32, batch_sizes=(8, 1), max_new_tokens: int = 8, repeats: int = 5,
                     benchmark: str = "chartqa", device: str | None = None, shape: dict | None = None) -> list[dict]:
    """`vlmkit eval run -m vlmkit:CKPT` against `-m hf:FOLDER` on one model: a LLaVA folder
    (`make_tiny_hf_llava` at `shape`) is imported with `vlmkit import-hf`, exported back with
    `vlmkit export-hf`, and both backends answer the same items from that exported folder and
    its checkpoint through the same runner. Each batch size is timed `repeats` times, the two
    backends interleaved; every run's answers must equal the first run's (vlmkit, batched).
    Returns one row per batch size with medians (wall and process CPU seconds) and the ratios."""
    import statistics

    from vlmkit.checkpoint import load_checkpoint
    from vlmkit.eval.backends import make_backend
    from vlmkit.eval.benchmarks import get_benchmark
    from vlmkit.eval.synth import synth_bench
    from vlmkit.hf.registry import export_hf, import_hf

    folder = make_tiny_hf_llava(root / "hf", shape=shape or EVAL_SHAPE, sharpen=True)
    model, _ = load_checkpoint(import_hf(folder, root / "imported"))
    exported = export_hf(model, root / "exported")
    checkpoint = import_hf(exported, root / "vlmkit")
    synth_bench(benchmark, root / "data", n=max(1, n // 2 + 1), write_gold=False)
    bench = get_benchmark(benchmark)
    items = bench.load(root / "data")[:n]
    backends = {"vlmkit": make_backend(f"vlmkit:{checkpoint}", device=device), "hf": make_backend(f"hf:{exported}", device=device)}
    for backend in backends.values():  # warm-up
        _run_eval(backend, bench, items[:2], root / f"warm-{backend.name.split(':')[0]}", 2, max_new_tokens)
    times = {(name, bs): ([], []) for name in backends for bs in batch_sizes}
    reference, runs = None, 0
    for _ in range(repeats):
        for bs in batch_sizes:
            for name, backend in backends.items():
                runs += 1
                wall, cpu, answers = _run_eval(backend, bench, items, root / f"run-{runs}", bs, max_new_tokens)
                reference = reference or answers
                if answers != reference:
                    diff = [k for k in reference if answers.get(k) != reference[k]]
                    raise AssertionError(f"{name} at batch {bs} answered {len(diff)} item(s) differently, e.g. {diff[0]!r}: "
                                         f"{answers.get(diff[0])!r} vs {reference[diff[0]]!r}")
                times[name, bs][0].append(wall)
                times[name, bs][1].append(cpu)
    med = {k: (statistics.median(w), statistics.median(c)) for k, (w, c) in times.items()}
    rows = []
    for bs in batch_sizes:
        row = {"what": "eval", "benchmark": benchmark, "items": len(items), "batch": bs, "max_new_tokens": max_new_tokens,
               "repeats": repeats, "same_answers": True}
        for name in backends:
            row[f"{name}_s"], row[f"{name}_cpu_s"] = med[name, bs]
        row["ratio"] = row["hf_s"] / row["vlmkit_s"]
        row["ratio_cpu"] = row["hf_cpu_s"] / row["vlmkit_cpu_s"]
        rows.append(row)
    one = min(batch_sizes)
    for row in rows:  # batched against one by one, per backend
        for name in backends:
            row[f"{name}_vs_one_by_one"] = med[name, one][0] / med[name, row["batch"]][0]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="backend spec (hf:..., openai:..., vlmkit:...) or tiny-hf")
    ap.add_argument("--benchmark", default="chartqa")
    ap.add_argument("--data", help="benchmark folder (default: a synthetic one)")
    ap.add_argument("--n", type=int, default=32, help="items to time")
    ap.add_argument("--batch-sizes", default="1,8", help="comma-separated, 1 = one-by-one")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--base-url")
    ap.add_argument("--device")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vlmkit.eval.backends import make_backend
    from vlmkit.eval.benchmarks import get_benchmark
    from vlmkit.eval.synth import synth_bench

    tmp = Path(tempfile.mkdtemp(prefix="vlmkit-evalbench-"))
    spec = args.model
    if spec == "tiny-hf":
        spec = "hf:" + str(make_tiny_hf_llava(tmp / "tiny-hf"))
    data = Path(args.data) if args.data else tmp / args.benchmark
    if not args.data:
        synth_bench(args.benchmark, data, n=max(1, args.n // 2 + 1), write_gold=False)
    bench = get_benchmark(args.benchmark)
    items = bench.load(data)[: args.n]
    requests = [(bench.prompt(it), it.load_images()) for it in items]  # decode once: time generation only
    backend = make_backend(spec, base_url=args.base_url, device=args.device)
    backend.generate(requests[:1], args.max_new_tokens)  # warm-up

    results, answers = {}, {}
    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        t0 = time.perf_counter()
        out: list[str] = []
        for i in range(0, len(requests), bs):
            out += backend.generate(requests[i : i + bs], args.max_new_tokens)
        dt = time.perf_counter() - t0
        results[f"batch_{bs}"] = round(len(requests) / dt, 3)
        answers[bs] = out
    base = next(iter(answers.values()))
    record = {
        "benchmark": args.benchmark, "model": args.model, "items": len(requests), "max_new_tokens": args.max_new_tokens,
        "samples_per_s": results, "answers_agree": {f"batch_{k}": sum(a == b for a, b in zip(v, base)) / len(base)
                                                    for k, v in answers.items()},
        "machine": platform.processor() or platform.machine(),
    }
    try:
        import torch

        record["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        record["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
