"""What a quickstart training step costs under each of the recipe's speed choices, side by side in
one run: the previous recipe (49 visual tokens from the MLP connector, fp32, SmolLM2's default
system turn) against each change alone and all together, on the same stage-2 samples.

Each step is a forward and backward pass of a batch of 8 (connector trained, tower features
precomputed as the feature cache provides them, LLM frozen), the cost the training loop pays.

    .venv/bin/python benchmarks/quickstart_step.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import yaml


def variants(base: dict) -> dict[str, tuple[dict, bool]]:
    """name -> (model section, bf16)."""
    old = {**base, "connector": {"name": "mlp", "options": {"input_norm": True}},
           "processor": {"name": "fixed", "image_size": 224, "options": {"fit": "squash"}}}
    old.pop("system_prompt", None)
    return {
        "previous recipe (49 tokens, fp32, default system turn)": (old, False),
        "+ bf16": (old, True),
        "+ 16 tokens (2x2 pixel shuffle at 256 px)": ({**base, "system_prompt": None}, False),
        "+ empty system turn": ({**old, "system_prompt": ""}, False),
        "all (the recipe now)": (base, True),
    }


def main(argv=None) -> int:
    from vlmkit.config import load_config
    from vlmkit.data.collate import collate
    from vlmkit.data.formats import read_llava_json
    from vlmkit.data.synthetic.tasks import generate
    from vlmkit.model.vlm import VisionLanguageModel
    from vlmkit.paths import offline
    from vlmkit.processing import build_chat_processor
    from vlmkit.quickstart import default_recipe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    offline()
    torch.set_num_threads(args.threads)
    data = tempfile.mkdtemp(prefix="vlmkit-qs-step-")
    generate(data, n_caption=0, n_instruct=24, n_test=0, seed=0)
    samples = read_llava_json(f"{data}/stage2.json")
    base = yaml.safe_load(default_recipe().read_text())["model"]
    results = {}
    for name, (model_section, bf16) in variants(base).items():
        model = VisionLanguageModel.build(load_config({"model": model_section}).model)
        model.set_trainable(["connector"])
        processor = build_chat_processor(model, 384)
        batches = [collate([processor.encode(s) for s in samples[i:i + 8]], 0) for i in range(0, 24, 8)]
        with torch.no_grad():
            for b in batches:
                b.image_features = model.view_features(b.images)

        def step(b) -> float:
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(b.input_ids, b.visuals, attention_mask=b.attention_mask, labels=b.labels)
            out.loss.backward()
            return time.perf_counter() - start

        step(batches[0])  # warm-up
        times = [step(b) for _ in range(args.repeats) for b in batches]
        results[name] = {"seconds_per_step": sum(times) / len(times), "tokens_per_sample": batches[0].input_ids.shape[1]}
        del model
    first = next(iter(results.values()))["seconds_per_step"]
    for name, r in results.items():
        r["speed-up"] = first / r["seconds_per_step"]
        print(json.dumps({"variant": name, **{k: round(v, 3) for k, v in r.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
