"""Training-step tokens/s: vlmkit against Hugging Face, same shapes, same batch, same machine, one
run. `--family llava` (default) compares with `LlavaForConditionalGeneration`; `--family anyres`
with `LlavaNextForConditionalGeneration` (AnyRes tiles, unpadding, newlines: four images of
different sizes and aspect ratios in the batch); `--family qwen2-vl` with
`Qwen2VLForConditionalGeneration` (native resolution, 2x2 merge, M-RoPE). For the last two the
reference holds vlmkit's weights (`vlmkit.hf.reference`, `vlmkit.families.llava_next.hf`) and the losses are checked equal first. Both train every parameter with AdamW (forward, backward,
optimizer step); both run the same SigLIP tower, 2-layer GELU projector and Llama decoder built
from the same configs. HF computes logits for every position; vlmkit runs the LM head only at
supervised positions, in chunks, through the training loop's own loss path.

    .venv/bin/python benchmarks/train_step.py                      # CPU shapes (small)
    .venv/bin/python benchmarks/train_step.py --preset gpu --device cuda   # SigLIP-B/16-384 + SmolLM2-360M, bf16
    .venv/bin/python benchmarks/train_step.py --family anyres --threads 1
    .venv/bin/python benchmarks/train_step.py --family qwen2-vl --threads 1

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


# ---- native-resolution and tiling families --------------------------------------------------------

FAMILY_SHAPES = dict(v_hidden=384, v_layers=6, v_heads=6, hidden=576, layers=8, heads=9, kv_heads=3, inter=1536,
                     vocab=49152, answer=16)
IMAGE_SIZES = ((640, 480), (480, 640), (800, 400), (500, 500))


def family_config(family: str, p: dict) -> dict:
    llm = {"hidden_size": p["hidden"], "intermediate_size": p["inter"], "num_hidden_layers": p["layers"],
           "num_attention_heads": p["heads"], "num_key_value_heads": p["kv_heads"], "vocab_size": p["vocab"],
           "tie_word_embeddings": True, "max_position_embeddings": 8192}
    if family == "anyres":
        tile = 224
        return {"vision": {"name": "hf-random", "config": {**vision_cfg({**p, "image": tile, "patch": 16, "v_inter": 4 * p["v_hidden"]})}},
                "connector": {"name": "mlp"}, "llm": {"name": "hf-random", "config": llm},
                "processor": {"name": "anyres", "image_size": tile,
                              "options": {"patch_size": 16, "grid_pinpoints": [[224, 448], [448, 224], [448, 448], [672, 224], [224, 672]]}}}
    return {"vision": {"name": "qwen2-vit", "config": {"depth": p["v_layers"], "embed_dim": p["v_hidden"], "num_heads": p["v_heads"],
                                                       "mlp_ratio": 4, "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2}},
            "connector": {"name": "pixel-shuffle", "options": {"ratio": 0.5, "norm": "pre", "norm_eps": 1e-6, "hidden_size": 4 * p["v_hidden"]}},
            "llm": {"name": "qwen2-vl-text-random", "config": llm},
            "processor": {"name": "qwen2vl", "options": {"max_pixels": 448 * 448}}}


def run_family(args) -> dict:
    from PIL import Image

    from vlmkit.config import ModelConfig
    from vlmkit.data.collate import collate
    from vlmkit.data.formats import Message, Sample
    from vlmkit.families.llava_next import hf as llava_next_hf
    from vlmkit.families.qwen2_vl.hf import qwen2_vl_reference
    from vlmkit.model.vlm import VisionLanguageModel
    from vlmkit.processing import build_chat_processor
    from vlmkit.train.losses import decoder_hidden, sequence_logps, sft_loss_sum

    p = dict(FAMILY_SHAPES)
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = VisionLanguageModel.build(ModelConfig.model_validate(family_config(args.family, p)), pretrained=False).to(device)
    ours.set_trainable(["vision", "connector", "llm"])
    ours.train()
    proc = build_chat_processor(ours, 8192)
    g = torch.Generator().manual_seed(0)
    answer = "the answer is " + "x" * (p["answer"] - 14)
    samples = [Sample(id=str(i), messages=[Message("user", "<image>\nDescribe the image in detail."), Message("assistant", answer)],
                      images=[Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())])
               for i, (w, h) in enumerate(IMAGE_SIZES)]
    encoded = [proc.encode(s) for s in samples]
    batch = collate(encoded, pad_id=0).to(device)
    head = ours.llm.get_output_embeddings()

    ref = (llava_next_hf.llava_next if args.family == "anyres" else qwen2_vl_reference)(ours).train()
    if args.family == "anyres":
        ref_inputs = {k: v.to(device) for k, v in llava_next_hf.llava_next_inputs(encoded).items()}
    else:
        ref_inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                      "pixel_values": torch.cat([im.pixel_values for im in batch.images]).to(device),
                      "image_grid_thw": torch.tensor([im.views[0].grid for im in batch.images], device=device),
                      "mm_token_type_ids": (batch.input_ids == ours.image_token_id).int()}
    ref_inputs["labels"] = batch.labels

    def our_loss():
        logps, counts = sequence_logps(decoder_hidden(ours, batch), batch, head)
        return sft_loss_sum(logps, counts, "token") / counts.sum()

    with torch.no_grad():
        a, b = float(our_loss()), float(ref(**ref_inputs).loss)
    if abs(a - b) > 1e-4 * max(1.0, abs(b)):
        raise SystemExit(f"losses differ: vlmkit {a:.6f} vs transformers {b:.6f}")
    opt_ours = torch.optim.AdamW([q for q in ours.parameters() if q.requires_grad], lr=1e-5)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-5)

    def ours_step():
        opt_ours.zero_grad(set_to_none=True)
        our_loss().backward()
        opt_ours.step()

    def ref_step():
        opt_ref.zero_grad(set_to_none=True)
        ref(**ref_inputs).loss.backward()
        opt_ref.step()

    t_ours, t_ref = float("inf"), float("inf")
    for _ in range(2):
        t_ref = min(t_ref, time_steps(ref_step, args.steps, args.warmup, device))
        t_ours = min(t_ours, time_steps(ours_step, args.steps, args.warmup, device))
    tokens = int(batch.attention_mask.sum())
    return {"family": args.family, "reference": type(ref).__name__, "device": str(device), "threads": torch.get_num_threads(),
            "batch": len(encoded), "image_sizes": [list(s) for s in IMAGE_SIZES],
            "image_tokens": [ours.count_image_tokens(im) for im in batch.images], "tokens": tokens,
            "loss_vlmkit": a, "loss_reference": b,
            "vlmkit_tokens_per_s": tokens / t_ours, "hf_tokens_per_s": tokens / t_ref, "ratio": t_ref / t_ours}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["llava", "anyres", "qwen2-vl"], default="llava")
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
    if args.family != "llava":
        result = run_family(args)
        print(json.dumps(result) if args.json else "\n".join(
            f"{k:>22}: {v:,.2f}" if isinstance(v, float) else f"{k:>22}: {v}" for k, v in result.items()))
        return
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
    batch = Batch([str(i) for i in range(B)], input_ids, mask, labels, (mask.cumsum(-1) - 1), ours._legacy_images(pixels),
                  None, B, targets, segments)
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
