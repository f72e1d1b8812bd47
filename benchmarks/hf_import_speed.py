"""Imported Hugging Face models: vlmkit against transformers at identical shapes, one run.

For a tiny-but-not-trivial Qwen2-VL and LLaVA-NeXT folder (random weights, saved with
`save_pretrained` as the tests' folder builders do, then `vlmkit import-hf`):

* generation tokens/s, vlmkit's `generate` vs transformers' `generate` on the folder itself, at
  batch 1 and 8 (greedy, a fixed number of new tokens on both sides: stop tokens are ignored, so
  both do the same work);
* one LoRA training step (forward, backward, AdamW on the adapters), vlmkit's LoRA (peft layers
  injected into the LLM) vs transformers + peft (`get_peft_model` with the same rank and targets,
  restricted to the language model), tokens/s over every position of the batch; measured by
  `lora_step.py` (same loss and gradients checked, median of interleaved repeats).

Ratios are vlmkit / transformers (above 1: vlmkit is faster).

    PYTHONPATH=src .venv/bin/python benchmarks/hf_import_speed.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "families" / "llava_next"), str(ROOT / "tests" / "families" / "qwen2_vl")]

QWEN = dict(text={"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8,
                  "num_key_value_heads": 4, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}},
            vision={"depth": 4, "embed_dim": 128, "num_heads": 4, "mlp_ratio": 4, "patch_size": 14}, max_pixels=224 * 224)
NEXT = dict(text={"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4},
            vision={"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}, tile=112, patch=14)
LORA = {"parts": ["llm"], "r": 16, "alpha": 32, "dropout": 0.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def timed_pair(ours, theirs, repeats: int) -> tuple[float, float]:
    """Median seconds of each, the two interleaved run by run, so a change in the (shared)
    machine's load hits both sides alike."""
    ours(), theirs()  # warm-up
    a, b = [], []
    for _ in range(repeats):
        for fn, times in ((ours, a), (theirs, b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def image(seed: int, size):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())


def prepare(family: str, root: Path):
    from llava_next_folder import save_llava_next
    from qwen2_vl_folder import save_qwen2vl

    from vlmkit.checkpoint import load_checkpoint
    from vlmkit.hf.registry import import_hf

    if family == "qwen2-vl":
        folder = save_qwen2vl(root / "hf", text=QWEN["text"], vision=QWEN["vision"], min_pixels=56 * 56, max_pixels=QWEN["max_pixels"])
        from transformers import Qwen2VLForConditionalGeneration as cls
    else:
        folder = save_llava_next(root / "hf", text=NEXT["text"], vision=NEXT["vision"], tile=NEXT["tile"], patch=NEXT["patch"])
        from transformers import LlavaNextForConditionalGeneration as cls
    model, _ = load_checkpoint(import_hf(folder, root / "vlmkit"))
    ref = cls.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    return model, ref


def encode(model, batch: int):
    from vlmkit.data.formats import Message
    from vlmkit.processing import build_chat_processor

    proc = build_chat_processor(model, 8192)
    return [proc.encode_prompt([Message("user", "<image>\nDescribe this picture in detail."),
                                Message("assistant", "A picture of random coloured noise, nothing else.")],
                               [image(i, (224, 168))]) for i in range(batch)]


def prompts(model, batch: int):
    from vlmkit.data.formats import Message
    from vlmkit.processing import build_chat_processor

    proc = build_chat_processor(model, 8192)
    return [proc.encode_prompt([Message("user", "<image>\nDescribe this picture in detail.")], [image(i, (224, 168))])
            for i in range(batch)]


def hf_inputs(family: str, model, encoded) -> dict:
    from vlmkit.families.llava_next.hf import llava_next_inputs

    if family == "llava-next":
        return llava_next_inputs(encoded)
    ids = torch.stack([e.input_ids for e in encoded])  # equal lengths: same prompt, same image size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.cat([e.images[0].pixel_values for e in encoded]),
            "image_grid_thw": torch.tensor([e.images[0].views[0].grid for e in encoded]),
            "mm_token_type_ids": (ids == model.image_token_id).int()}


def generation(family: str, model, ref, batch: int, new_tokens: int, repeats: int) -> dict:
    import vlmkit.generate as G

    ps = prompts(model, batch)
    inputs = hf_inputs(family, model, ps)
    real_stops = G.extra_stop_ids
    G.extra_stop_ids = lambda tok: []  # fixed-length decoding (see the module notes)
    eos = model.tokenizer.eos_token_id
    try:
        cfg = G.GenerationConfig(max_new_tokens=new_tokens)

        def ours():
            with torch.no_grad():
                out = _no_eos(model, lambda: G.generate(model, ps, cfg))
            assert all(len(o) == new_tokens for o in out), [len(o) for o in out]

        def theirs():
            with torch.no_grad():
                out = ref.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   eos_token_id=eos, pad_token_id=model.tokenizer.pad_token_id)
            assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens

        t_ours, t_theirs = timed_pair(ours, theirs, repeats)
    finally:
        G.extra_stop_ids = real_stops
    n = batch * new_tokens
    return {"batch": batch, "new_tokens": new_tokens, "vlmkit_tok_s": n / t_ours, "hf_tok_s": n / t_theirs, "ratio": t_theirs / t_ours}


class _NoEos:
    """The tokenizer with its eos id hidden from vlmkit's stop rule (everything else delegated)."""

    eos_token_id = None

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)


def _no_eos(model, fn):
    tok = model.tokenizer
    model.tokenizer = _NoEos(tok)
    try:
        return fn()
    finally:
        model.tokenizer = tok


def lora_step(family: str, batch: int, repeats: int) -> dict:
    """One LoRA step against transformers + peft: `lora_step.py`'s measurement (its own pair of
    models, the answer supervised on both sides, equal losses and gradients checked first)."""
    from lora_step import run

    r = run(family, batch, repeats, torch.device("cpu"))
    return {"batch": batch, "tokens": r["tokens"], "vlmkit_tok_s": r["tokens"] / r["vlmkit_s"],
            "hf_peft_tok_s": r["tokens"] / r["hf_peft_s"], "ratio": r["ratio"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--families", default="qwen2-vl,llava-next")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for family in args.families.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            model, ref = prepare(family, Path(tmp))
            for batch in (1, 8):
                rows.append({"family": family, "what": "generate", **generation(family, model, ref, batch, args.new_tokens, args.repeats)})
                print(json.dumps(rows[-1]), flush=True)
        rows.append({"family": family, "what": "lora-step", **lora_step(family, 8, max(args.repeats, 5))})
        print(json.dumps(rows[-1]), flush=True)
    print()
    print("| family | measure | batch | vlmkit tok/s | transformers tok/s | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        hf = r.get("hf_tok_s", r.get("hf_peft_tok_s"))
        what = "generate" if r["what"] == "generate" else "LoRA step (vs transformers + peft)"
        print(f"| {r['family']} | {what} | {r['batch']} | {r['vlmkit_tok_s']:.0f} | {hf:.0f} | {r['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
