"""One LoRA training step of an imported model: vlmkit against transformers + peft, same shapes.

For a tiny-but-not-trivial Qwen2-VL (256-wide 4-layer decoder, 4-layer ViT, 48 visual tokens per
image) and LLaVA-NeXT folder (random weights, saved with `save_pretrained`, then imported with
`vlmkit import-hf`, as `hf_import_speed.py` builds them), both sides take the same step: a batch
of 8 chat samples (one image each, the answer supervised), forward, backward, AdamW on the
adapters. vlmkit adds its LoRA (`lora.add_adapters`, peft layers in the LLM); transformers gets
`get_peft_model` with the same rank, alpha and targets, restricted to the language model, and
the same adapter weights. Before timing, the script checks that the two losses and the adapters'
gradients agree.

The two sides run interleaved, step by step, and each figure is the median of the repeats, so
a change in a shared machine's load hits both alike. Process CPU seconds (user + sys) per step
are reported too. The ratio is transformers' time / vlmkit's (above 1: vlmkit is faster).

    PYTHONPATH=src .venv/bin/python benchmarks/lora_step.py --threads 1 --repeats 7
    PYTHONPATH=src .venv/bin/python benchmarks/lora_step.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_import_speed import LORA, hf_inputs, image, prepare


def encode(model, batch: int) -> list:
    """Training samples (the answer supervised), one distinct 224x168 image each."""
    import io

    from vlmkit.core.types import Message, Sample
    from vlmkit.processing import build_chat_processor

    proc = build_chat_processor(model, 8192)
    out = []
    for i in range(batch):
        png = io.BytesIO()
        image(i, (224, 168)).save(png, format="PNG")
        out.append(proc.encode(Sample(f"s{i}", [Message("user", "<image>\nDescribe this picture in detail."),
                                                Message("assistant", "A picture of random coloured noise, nothing else.")],
                                      [png.getvalue()])))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def timed_steps(sides: dict, repeats: int, device: torch.device) -> dict:
    """Median wall and CPU seconds per step of each side, interleaved step by step."""
    for fn in sides.values():  # warm-up
        fn()
    wall = {k: [] for k in sides}
    cpu = {k: [] for k in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            sync(device)
            c0, t0 = cpu_seconds(), time.perf_counter()
            fn()
            sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(cpu_seconds() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in sides}


def peft_model_like(model, ref):
    """transformers + peft with vlmkit's adapter spec on the language model, and vlmkit's
    adapter weights copied in (so the two steps are the same computation)."""
    from peft import LoraConfig, get_peft_model

    targets = r".*language_model.*\.(" + "|".join(LORA["targets"]) + ")"
    peft_model = get_peft_model(ref, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=targets))
    ours = adapter_tensors(model)
    theirs = adapter_tensors(peft_model)
    if sorted(ours) != sorted(theirs):
        raise RuntimeError(f"adapters differ: {sorted(ours)[:3]} vs {sorted(theirs)[:3]}")
    with torch.no_grad():
        for key, p in theirs.items():
            p.copy_(ours[key])
    return peft_model


def adapter_tensors(module) -> dict[str, torch.Tensor]:
    """Trainable tensors keyed by (layer index, projection, A or B), whatever the wrapping."""
    import re

    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            m = re.search(r"layers\.(\d+)\..*\.(\w+_proj)\.lora_([AB])\.", name)
            if m is None:
                raise RuntimeError(f"trainable tensor {name} is not an adapter")
            out[m.group(1), m.group(2), m.group(3)] = p
    return out


def setup(family: str, root: Path, batch: int, device: torch.device, seed: int = 0):
    """(our step, their step, a parity check) on one prepared pair of models."""
    from vlmkit.data.collate import collate
    from vlmkit.model import lora
    from vlmkit.model.vlm import lm_head
    from vlmkit.train.losses import decoder_rows, sequence_logps, sft_loss_sum, step_normaliser

    torch.manual_seed(seed)
    model, ref = prepare(family, root)
    model.to(device)
    ref.to(device)
    encoded = encode(model, batch)
    b = collate(encoded, pad_id=model.tokenizer.pad_token_id).to(device)
    model.set_trainable(["llm"])
    lora.add_adapters(model, LORA)
    model.train()
    with torch.no_grad():  # B starts at zero: give it values so that A's gradients are not all zero
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.02)
    peft_model = peft_model_like(model, ref)
    peft_model.train()
    inputs = {k: v.to(device) for k, v in hf_inputs(family, model, encoded).items()}
    if inputs["input_ids"].shape != b.input_ids.shape or not torch.equal(inputs["input_ids"], b.input_ids):
        raise RuntimeError("the two sides read different token ids")
    head = lm_head(model.llm)
    labels = b.labels  # the answer tokens, as vlmkit's collate supervises them, on both sides

    def ours_forward():  # the SFT objective's loss, as `vlmkit train` computes it (mean over answer tokens)
        logps, counts = sequence_logps(decoder_rows(model, b), b, head)
        return sft_loss_sum(logps, counts, "token") / step_normaliser(counts, "token")

    def theirs_forward():
        return peft_model(**inputs, labels=labels).loss

    check = {"ours": ours_forward, "theirs": theirs_forward, "ours_params": adapter_tensors(model),
             "theirs_params": adapter_tensors(peft_model)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    hf_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    ours = step_fn(ours_forward, opt)
    theirs = step_fn(theirs_forward, hf_opt)
    return ours, theirs, check, int(b.input_ids.numel())


def step_fn(forward, opt):
    def step():
        forward().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def parity(check: dict) -> dict:
    """Loss and adapter-gradient agreement of one step (before any optimizer step)."""
    losses, grads = {}, {}
    for side in ("ours", "theirs"):
        for p in check[f"{side}_params"].values():
            p.grad = None
        loss = check[side]()
        loss.backward()
        losses[side] = float(loss.detach())
        grads[side] = {k: p.grad.detach().clone() for k, p in check[f"{side}_params"].items()}
        for p in check[f"{side}_params"].values():
            p.grad = None
    worst = max(float((grads["ours"][k] - grads["theirs"][k]).abs().max() / grads["theirs"][k].abs().max().clamp(min=1e-12))
                for k in grads["theirs"])
    return {"loss_vlmkit": losses["ours"], "loss_hf_peft": losses["theirs"],
            "loss_abs_diff": abs(losses["ours"] - losses["theirs"]), "grad_max_rel_diff": worst}


def run(family: str, batch: int, repeats: int, device: torch.device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs, check, tokens = setup(family, Path(tmp), batch, device)
        agree = parity(check)
        times = timed_steps({"vlmkit": ours, "hf_peft": theirs}, repeats, device)
    (t_ours, c_ours), (t_theirs, c_theirs) = times["vlmkit"], times["hf_peft"]
    return {"family": family, "batch": batch, "tokens": tokens, "repeats": repeats, "device": str(device),
            "vlmkit_s": t_ours, "hf_peft_s": t_theirs, "vlmkit_cpu_s": c_ours, "hf_peft_cpu_s": c_theirs,
            "ratio": t_theirs / t_ours, "cpu_ratio": c_theirs / c_ours, **agree}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--families", default="qwen2-vl,llava-next")
    ap.add_argument("--json", help="append each row to this JSONL file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for family in args.families.split(","):
        rows.append(run(family, args.batch, args.repeats, device))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    print()
    print(f"LoRA step, batch {args.batch}, {args.device}, {args.threads} thread(s), median of {args.repeats} interleaved repeats")
    print("| family | tokens | vlmkit s/step | transformers + peft s/step | ratio | CPU-seconds ratio | loss vlmkit / peft | max grad rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['tokens']} | {r['vlmkit_s']:.3f} | {r['hf_peft_s']:.3f} | {r['ratio']:.2f} | {r['cpu_ratio']:.2f} | "
              f"{r['loss_vlmkit']:.6f} / {r['loss_hf_peft']:.6f} | {r['grad_max_rel_diff']:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
