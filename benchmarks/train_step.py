"""Training-step tokens/s: vlmkit against Hugging Face `LlavaForConditionalGeneration`, same shapes,
same batch, same machine, one run. Both train every parameter with AdamW (forward, backward,
optimizer step); both run the same SigLIP tower, 2-layer GELU projector and Llama decoder built
from the same configs. HF computes logits for every position; vlmkit runs the LM head only at
supervised positions, in chunks, through the training loop's own loss path.

    .venv/bin/python benchmarks/train_step.py                      # CPU shapes (small)
    .venv/bin/python benchmarks/train_step.py --preset gpu --device cuda   # SigLIP-B/16-384 + SmolLM2-360M, bf16

tokens/s counts every position of the batch (image + text), the figure the issue quotes.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

PRESETS = {
    # A ViT-S/16-like tower and a narrow 8-layer SmolLM2-shaped decoder (full 49k vocabulary).
    "cpu": dict(image=224, patch=16, v_hidden=384, v_layers=6, v_heads=6, v_inter=1536,
                hidden=576, layers=8, heads=9, kv_heads=3, inter=1536, vocab=49152,
                text=64, answer=16, batch=4, dtype="fp32"),
    # The GPU shapes: SigLIP-B/16-384 (576 image tokens) + SmolLM2-360M, 256 text tokens.
    "gpu": dict(image=384, patch=16, v_hidden=768, v_layers=12, v_heads=12, v_inter=3072,
                hidden=960, layers=32, heads=15, kv_heads=5, inter=2560, vocab=49152,
                text=256, answer=64, batch=32, dtype="bf16"),
}


def vision_cfg(p):
    return {"hidden_size": p["v_hidden"], "intermediate_size": p["v_inter"], "num_hidden_layers": p["v_layers"],
            "num_attention_heads": p["v_heads"], "image_size": p["image"], "patch_size": p["patch"], "vision_use_head": False}


def text_cfg(p):
    return {"hidden_size": p["hidden"], "intermediate_size": p["inter"], "num_hidden_layers": p["layers"],
            "num_attention_heads": p["heads"], "num_key_value_heads": p["kv_heads"], "vocab_size": p["vocab"],
            "tie_word_embeddings": True, "max_position_embeddings": 4096}


def build_vlmkit(p, device):
    from vlmkit.config import ModelConfig
    from vlmkit.model.vlm import VisionLanguageModel

    cfg = ModelConfig.model_validate({
        "vision": {"name": "hf-random", "config": vision_cfg(p)},
        "llm": {"name": "hf-random", "config": text_cfg(p)},
        "connector": {"name": "mlp"},
        "processor": {"image_size": p["image"]},
    })
    model = VisionLanguageModel.build(cfg, pretrained=False).to(device)
    model.set_trainable(["vision", "connector", "llm"])
    return model


def build_hf(p, device, image_token_id):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    config = LlavaConfig(vision_config=SiglipVisionConfig(**vision_cfg(p)), text_config=LlamaConfig(**text_cfg(p)),
                         image_token_index=image_token_id, vision_feature_layer=-1, vision_feature_select_strategy="full",
                         projector_hidden_act="gelu", tie_word_embeddings=True)
    return LlavaForConditionalGeneration(config).to(device).train()


def make_batch(p, image_token_id, device):
    g = torch.Generator().manual_seed(0)
    n_img = (p["image"] // p["patch"]) ** 2
    B = p["batch"]
    text = torch.randint(0, 255, (B, p["text"]), generator=g)
    input_ids = torch.cat([torch.full((B, n_img), image_token_id), text], 1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -p["answer"]:] = input_ids[:, -p["answer"]:]
    pixels = torch.randn(B, 3, p["image"], p["image"], generator=g)
    return input_ids.to(device), labels.to(device), pixels.to(device)


def time_steps(step, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--hf-attn", default="sdpa", help="HF attention implementation (sdpa or eager)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    p = dict(PRESETS[args.preset])
    if args.batch:
        p["batch"] = args.batch
    device = torch.device(args.device)
    bf16 = p["dtype"] == "bf16"

    from vlmkit.data.collate import Batch
    from vlmkit.train.losses import decoder_hidden, sequence_logps, sft_loss_sum

    torch.manual_seed(0)
    ours = build_vlmkit(p, device)
    input_ids, labels, pixels = make_batch(p, ours.image_token_id, device)
    B, T = input_ids.shape
    mask = torch.ones_like(input_ids)
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    segments = torch.arange(B, device=device)[:, None].expand(B, T).contiguous()
    batch = Batch([str(i) for i in range(B)], input_ids, mask, labels, (mask.cumsum(-1) - 1), pixels, None, B, targets, segments)
    opt_ours = torch.optim.AdamW([q for q in ours.parameters() if q.requires_grad], lr=1e-5)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    def ours_step():
        opt_ours.zero_grad(set_to_none=True)
        with autocast():
            hidden = decoder_hidden(ours, batch)
            logps, counts = sequence_logps(hidden, batch, ours.llm.get_output_embeddings())
            loss = sft_loss_sum(logps, counts, "token") / counts.sum()
        loss.backward()
        opt_ours.step()

    hf = build_hf(p, device, ours.image_token_id)
    hf.config._attn_implementation = args.hf_attn
    for sub in (hf.model.language_model, hf.model.vision_tower):
        sub.config._attn_implementation = args.hf_attn
    hf_ids = input_ids.clone()
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-5)

    def hf_step():
        opt_hf.zero_grad(set_to_none=True)
        with autocast():
            out = hf(input_ids=hf_ids, attention_mask=mask, pixel_values=pixels, labels=labels)
        out.loss.backward()
        opt_hf.step()

    n_ours = sum(q.numel() for q in ours.parameters())
    n_hf = sum(q.numel() for q in hf.parameters())
    # Interleave so drift in machine load hits both alike; keep each one's best.
    t_ours, t_hf = float("inf"), float("inf")
    for _ in range(2):
        t_hf = min(t_hf, time_steps(hf_step, args.steps, args.warmup, device))
        t_ours = min(t_ours, time_steps(ours_step, args.steps, args.warmup, device))
    tokens = B * T
    result = {
        "preset": args.preset, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "batch": B, "seq_len": T, "image_tokens": T - p["text"], "supervised_per_sample": p["answer"],
        "params_vlmkit": n_ours, "params_hf": n_hf, "dtype": p["dtype"], "hf_attn": args.hf_attn,
        "vlmkit_tokens_per_s": tokens / t_ours, "hf_tokens_per_s": tokens / t_hf, "ratio": t_hf / t_ours,
    }
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v:,.1f}" if isinstance(v, float) else f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
