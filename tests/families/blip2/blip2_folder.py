"""Tiny random BLIP-2 (OPT LLM) / InstructBLIP (Llama LLM) folders, saved with `save_pretrained`
and an offline tokenizer (vlmkit's byte-level one plus the family's special tokens), and their
parity cases: the same input ids (and, for InstructBLIP, the same Q-Former instruction ids) as the
HF processor built with the PIL image processor, for several instructions, and pixel values within
docs/preprocessing.md's tolerance."""

from __future__ import annotations

from pathlib import Path

import torch
from _parity import ParityCase
from tokenizers import processors

from vlmkit.core.types import Message
from vlmkit.processing import build_chat_processor
from vlmkit.tokenizer import byte_level_tokenizer

# docs/preprocessing.md: resized pixels within 3 of 255 intensity levels of the reference.
PIXEL_TOLERANCE = 3 / 255
# The instructions whose ids are checked against the HF processor on every parity image.
INSTRUCTIONS = ("What is shown?", "Question: what colour? Answer:", "Describe it.")


def _sharpen(model) -> None:
    # Random init leaves the LM near-uniform; sharper logits make greedy comparisons meaningful,
    # and non-trivial norm weights show a mis-mapped norm.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8)
        for name, p in model.named_parameters():
            if ("norm" in name.lower()) and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
        if hasattr(model, "query_tokens"):
            model.query_tokens.normal_()


def with_bos(tok):
    """The tokenizer adds its BOS before every text, as OPT's / Llama's do."""
    bos = tok.bos_token
    tok._tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                                  special_tokens=[(bos, tok.bos_token_id)])
    return tok


def blip_tokenizer():
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    tok.chat_template = None
    return with_bos(tok)


def qformer_tokenizer():
    """A BERT-like Q-Former tokenizer: [CLS]-ish start and [SEP]-ish end around the text."""
    tok = byte_level_tokenizer()
    tok.chat_template = None
    bos, eos = tok.bos_token, tok.eos_token
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, tok.bos_token_id), (eos, tok.eos_token_id)])
    return tok


def save_blip(folder: Path, *, instruct: bool = False, seed: int = 0, image: int = 28, patch: int = 7, queries: int = 6,
              llm: str = "opt") -> Path:
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    torch.manual_seed(seed)
    tok = blip_tokenizer()
    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if llm == "opt":
        text = {"model_type": "opt", "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "word_embed_proj_dim": 64, "max_position_embeddings": 512, **ids}
    else:
        text = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 512, **ids}
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": image,
              "patch_size": patch, "initializer_range": 0.05}
    qtok = qformer_tokenizer() if instruct else None
    qformer = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
               "cross_attention_frequency": 2, "encoder_hidden_size": 48, "initializer_range": 0.05}
    if instruct:
        qformer |= {"vocab_size": len(qtok), "max_position_embeddings": 128, "pad_token_id": qtok.pad_token_id}
    config_cls, model_cls = (InstructBlipConfig, InstructBlipForConditionalGeneration) if instruct else (Blip2Config, Blip2ForConditionalGeneration)
    config = config_cls(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=queries,
                        image_token_id=tok.convert_tokens_to_ids("<image>"), initializer_range=0.05)
    model = model_cls(config).eval()
    _sharpen(model)
    model.save_pretrained(folder, safe_serialization=True)
    image_processor = BlipImageProcessorPil(size={"height": image, "width": image}, image_mean=[0.5, 0.4, 0.3],
                                            image_std=[0.25, 0.3, 0.35])
    if instruct:
        InstructBlipProcessor(image_processor=image_processor, tokenizer=tok, qformer_tokenizer=qtok,
                              num_query_tokens=queries).save_pretrained(folder)
    else:
        Blip2Processor(image_processor=image_processor, tokenizer=tok, num_query_tokens=queries).save_pretrained(folder)
    return Path(folder)


def hf_processor(folder, instruct: bool):
    from transformers import AutoTokenizer, Blip2Processor, InstructBlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    kw = {"image_processor": BlipImageProcessorPil.from_pretrained(folder, local_files_only=True),
          "tokenizer": AutoTokenizer.from_pretrained(folder, local_files_only=True)}
    if instruct:
        kw["qformer_tokenizer"] = AutoTokenizer.from_pretrained(folder / "qformer_tokenizer", local_files_only=True)
    return (InstructBlipProcessor if instruct else Blip2Processor).from_pretrained(folder, local_files_only=True, **kw)


def check_inputs(folder, image, text, prompt, model, instruct: bool) -> dict:
    """Asserts vlmkit's prompt matches the HF processor's (ids, Q-Former ids, six image tokens,
    pixels); returns the HF processor's inputs with vlmkit's pixels."""
    hf_inputs = hf_processor(folder, instruct)(images=image, text=text, return_tensors="pt")
    assert prompt.input_ids.tolist() == hf_inputs["input_ids"][0].tolist()
    assert model.count_image_tokens(prompt.images[0]) == int((hf_inputs["input_ids"] == model.image_token_id).sum()) == 6
    if instruct:
        assert prompt.images[0].instruction_ids.tolist() == hf_inputs["qformer_input_ids"][0].tolist()
    ours_pixels = prompt.images[0].pixel_values
    std = torch.tensor(model.config.processor.std)[:, None, None]
    assert ((ours_pixels - hf_inputs["pixel_values"]).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    return dict(hf_inputs, pixel_values=ours_pixels)


def _parity_reference(instruct: bool):
    def reference(folder, image, question, prompt, model):
        chat = build_chat_processor(model, 4096)
        for text in INSTRUCTIONS:
            if text != question:
                check_inputs(folder, image, text, chat.encode_prompt([Message("user", "<image>" + text)], [image]), model, instruct)
        inputs = check_inputs(folder, image, question, prompt, model, instruct)
        return inputs.pop("input_ids")[0], inputs

    return reference


def _save(instruct: bool, llm: str):
    return lambda folder: save_blip(folder, instruct=instruct, llm=llm)


SIZES = ((60, 40), (28, 28), (20, 90))
PARITY = (
    ParityCase("blip2", _save(False, "opt"), "Blip2ForConditionalGeneration", _parity_reference(False), sizes=SIZES, image_text="<image>"),
    ParityCase("blip2/llama", _save(False, "llama"), "Blip2ForConditionalGeneration", _parity_reference(False), sizes=SIZES,
               image_text="<image>"),
    ParityCase("blip2/instructblip", _save(True, "llama"), "InstructBlipForConditionalGeneration", _parity_reference(True), sizes=SIZES,
               image_text="<image>"),
)
