"""A tiny random Qwen3-VL folder, saved with `save_pretrained` and an offline tokenizer
(vlmkit's byte-level one with the vision tokens), and its parity case: the same input ids and
visual-token counts as Qwen3VLProcessor's rule (Qwen2VLImageProcessorPil's grids), pixels within
docs/preprocessing.md's tolerance; the harness passes vlmkit's M-RoPE positions and checks logits
and greedy tokens against Qwen3VLForConditionalGeneration, whose DeepStack levels and
interleaved M-RoPE are its own."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _hf_folders import _sharpen
from _parity import ParityCase
from qwen2_vl_folder import QWEN2VL_TEMPLATE, check_against_processor, qwen2vl_tokenizer, qwen_reference_ids


def save_qwen3vl(folder: Path, *, seed: int = 0, text: dict | None = None, vision: dict | None = None,
                 min_pixels: int = 256, max_pixels: int = 16384, tie: bool = False, init: float | None = None,
                 moe: bool = False) -> Path:
    """Two DeepStack levels (after ViT blocks 0 and 1) over a 3-layer decoder; `moe`: Qwen3-VL-MoE,
    4 experts of which 2 per token in every layer but the first (a dense MLP there)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    tok = qwen2vl_tokenizer()
    vocab = tok.get_vocab()
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "max_position_embeddings": 4096, "vocab_size": len(tok),
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True},
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, **(text or {})}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "patch_size": 4, "temporal_patch_size": 2,
              "spatial_merge_size": 2, "num_position_embeddings": 36, "deepstack_visual_indexes": [0, 1],
              "out_hidden_size": text["hidden_size"], **(vision or {})}
    if moe:
        text |= {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
                 "mlp_only_layers": [0], "tie_word_embeddings": tie}
    config_cls, model_cls = (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe else (Qwen3VLConfig, Qwen3VLForConditionalGeneration)
    config = config_cls(text_config=text, vision_config=vision, image_token_id=vocab["<|image_pad|>"],
                           video_token_id=vocab["<|video_pad|>"], vision_start_token_id=vocab["<|vision_start|>"],
                           vision_end_token_id=vocab["<|vision_end|>"], tie_word_embeddings=tie)
    if init is not None:
        config.initializer_range = config.text_config.initializer_range = config.vision_config.initializer_range = init
    model = model_cls(config).eval()
    _sharpen(model)
    with torch.no_grad():  # every merger norm non-trivial, so a mis-mapped one shows
        for name, p in model.named_parameters():
            if "merger" in name and name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (Path(folder) / "chat_template.jinja").write_text(QWEN2VL_TEMPLATE)
    Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=vision["patch_size"],
                             merge_size=vision["spatial_merge_size"], temporal_patch_size=vision["temporal_patch_size"],
                             image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.3, 0.35]).save_pretrained(folder)
    return Path(folder)


def _parity_reference(model_class: str):
    def reference(folder, image, question, prompt, model):
        # transformers' auto class picks this model class for the folder.
        assert json.loads((Path(folder) / "config.json").read_text())["architectures"] == [model_class]
        ref_ids, ref_pixels, counts = qwen_reference_ids(folder, [image], question)
        return ref_ids, check_against_processor(ref_pixels, counts, prompt, model)

    return reference


# The image directly before the question, as Qwen3VLProcessor's content list renders it.
PARITY = (
    ParityCase("qwen3_vl", save_qwen3vl, "Qwen3VLForConditionalGeneration", _parity_reference("Qwen3VLForConditionalGeneration"),
               sizes=((72, 40), (24, 56), (100, 100), (71, 45)), question="Describe the picture.", image_text="<image>"),
    ParityCase("qwen3_vl/qwen3_vl_moe", lambda folder: save_qwen3vl(folder, moe=True), "Qwen3VLMoeForConditionalGeneration",
               _parity_reference("Qwen3VLMoeForConditionalGeneration"),
               sizes=((72, 40), (24, 56), (71, 45)), question="Describe the picture.", image_text="<image>"),
)
