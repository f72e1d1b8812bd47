"""Tiny random PaliGemma / PaliGemma 2 folders saved with `save_pretrained` and their processor
(SigLIP's PIL image processor; an offline byte-level tokenizer plus the family's special tokens),
and their parity cases: the same ids and visual-token count as PaliGemmaProcessor, pixels within
docs/preprocessing.md's tolerance, logits within 1e-4 under the prefix-LM mask (a causal reading
differs), the same greedy tokens."""

from __future__ import annotations

from pathlib import Path

import torch
from _parity import ParityCase

from vlmkit.model.attention import attention_rule
from vlmkit.tokenizer import byte_level_tokenizer
from vlmkit.processing.base import VisualBatch

# docs/preprocessing.md: resized pixels within 3 of 255 intensity levels of the reference.
PIXEL_TOLERANCE = 3 / 255


def sharpen_gemma(model) -> None:
    # Random init leaves the LM near-uniform: sharper logits make greedy comparisons meaningful;
    # non-trivial norm weights show a mis-mapped norm.
    with torch.no_grad():
        model.lm_head.weight.mul_(8) if not model.config.tie_word_embeddings else model.get_input_embeddings().weight.mul_(4)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm" in name.rsplit(".", 2)[-2]:
                p.uniform_(0.5, 1.5) if "language_model" not in name else p.uniform_(-0.3, 0.3)


def save_paligemma(folder: Path, *, seed: int = 0, size: int = 32, patch: int = 8, text: dict | None = None) -> Path:
    """`text={"model_type": "gemma2", ...}`: PaliGemma 2."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    torch.manual_seed(seed)
    tok = byte_level_tokenizer()
    tok.chat_template = None  # released PaliGemma folders have none
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    tokens = (size // patch) ** 2
    image_processor = SiglipImageProcessorPil(size={"height": size, "width": size}, image_seq_length=tokens,
                                              image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.3, 0.35])
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)  # adds its <loc> / <seg> tokens
    text = {"model_type": "gemma", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 4096, "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, **(text or {})}
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": size,
              "patch_size": patch, "vision_use_head": False}
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                             projection_dim=text["hidden_size"], hidden_size=text["hidden_size"], vocab_size=len(tok))
    model = PaliGemmaForConditionalGeneration(config).eval()
    sharpen_gemma(model)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return Path(folder)


def save_paligemma2(folder: Path) -> Path:
    """A PaliGemma 2 folder: a Gemma 2 LLM with a sliding window shorter than the prompt."""
    return save_paligemma(folder, text={"model_type": "gemma2", "sliding_window": 12,
                                        "layer_types": ["sliding_attention", "full_attention"], "query_pre_attn_scalar": 16})


def paligemma_processor(folder):
    from transformers import AutoTokenizer, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return PaliGemmaProcessor.from_pretrained(folder, local_files_only=True,
                                              image_processor=SiglipImageProcessorPil.from_pretrained(folder, local_files_only=True),
                                              tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))


def check_inputs_and_rule(model, folder, prompt, images, text: str, rule: str) -> dict:
    """PaliGemmaProcessor's inputs for `text` (no chat template), checked against vlmkit's prompt
    (`check_against_processor`), holding vlmkit's pixels."""
    hf_inputs = paligemma_processor(folder)(images=[images], text=text, return_tensors="pt")
    return check_against_processor(model, prompt, hf_inputs, rule)


def check_against_processor(model, prompt, hf_inputs, rule: str) -> dict:
    """vlmkit's prompt against the family's transformers processor's inputs: ids, image-token
    count, pixels; and that the model's attention `rule` matters (a causal reading gives other
    logits). Returns transformers' inputs holding vlmkit's pixels (no labels)."""
    assert model.config.attention == rule
    assert prompt.input_ids.tolist() == hf_inputs["input_ids"][0].tolist()
    assert sum(model.count_image_tokens(im) for im in prompt.images) == int((hf_inputs["input_ids"] == model.image_token_id).sum())
    ours_pixels = torch.cat([im.pixel_values for im in prompt.images])
    std = torch.tensor(model.config.processor.std)[:, None, None]
    assert ((ours_pixels - hf_inputs["pixel_values"]).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    with torch.no_grad():
        ours = model(prompt.input_ids[None], visuals=VisualBatch(prompt.images)).logits
        model.attention_rule = attention_rule("causal")
        try:
            causal = model(prompt.input_ids[None], visuals=VisualBatch(prompt.images)).logits
        finally:
            model.attention_rule = attention_rule(rule)
    assert (ours - causal).abs().max() > 1e-3  # the attention rule matters: a causal reading differs
    inputs = dict(hf_inputs, pixel_values=ours_pixels)
    inputs.pop("labels", None)
    return inputs


def _parity_reference(folder, image, question, prompt, model):
    inputs = check_inputs_and_rule(model, folder, prompt, [image], "<image>" + question, "prefix")
    return inputs.pop("input_ids")[0], inputs


_SIZES = ((20, 20), (72, 40), (24, 90))
PARITY = (
    ParityCase("paligemma", save_paligemma, "PaliGemmaForConditionalGeneration", _parity_reference, sizes=_SIZES,
               image_text="<image>"),
    ParityCase("paligemma/paligemma2", save_paligemma2, "PaliGemmaForConditionalGeneration", _parity_reference, sizes=_SIZES,
               image_text="<image>"),
)
