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


def make_tiny_hf_llava(out: Path, seed: int = 0) -> Path:
    """A randomly initialised LLaVA (1-layer CLIP + 1-layer Llama) with a word-level tokenizer,
    saved as a Hugging Face folder; only for exercising the HF backend offline."""
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

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ip = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          chat_template=template, num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=28, patch_size=14),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_index=4, vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(cfg).save_pretrained(out)
    proc.save_pretrained(out)
    return out


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
