"""A tiny random Fuyu folder, saved with `save_pretrained` and an offline tokenizer (vlmkit's
byte-level one with Fuyu's `|SPEAKER|`, `|NEWLINE|`, `<s>` and `<0x04>`), and its parity case:
the same input ids and patch counts as FuyuProcessor's layout (its PIL image processor's own
patches and replacement text), the same patches (padding included), on images smaller and larger
than the canvas."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from _parity import ParityCase

from vlmkit.core.types import Message
from vlmkit.processing import build_chat_processor
from vlmkit.tokenizer import byte_level_tokenizer

# docs/preprocessing.md: resized pixels within 3 of 255 intensity levels of the reference.
PIXEL_TOLERANCE = 3 / 255


def fuyu_tokenizer():
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>", "additional_special_tokens": ["|SPEAKER|", "|NEWLINE|", "<0x04>"]},
                           replace_extra_special_tokens=False)
    tok.chat_template = None
    return tok


def save_fuyu(folder: Path, *, seed: int = 0, patch: int = 6, height: int = 48, width: int = 72) -> Path:
    from transformers import FuyuConfig, FuyuForCausalLM, FuyuProcessor
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    torch.manual_seed(seed)
    tok = fuyu_tokenizer()
    text = {"model_type": "persimmon", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 1024, "vocab_size": len(tok), "qk_layernorm": True, "partial_rotary_factor": 0.5,
            "hidden_act": "relu2", "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}
    config = FuyuConfig(text_config=text, patch_size=patch, num_channels=3, image_token_id=tok.convert_tokens_to_ids("|SPEAKER|"),
                        image_size=height)
    model = FuyuForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    image_processor = FuyuImageProcessorPil(size={"height": height, "width": width}, patch_size={"height": patch, "width": patch},
                                            image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.3, 0.35])
    FuyuProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    return Path(folder)


def fuyu_reference(folder, image, text):
    """What FuyuProcessor produces: (input ids, patches). Its `__call__` cannot run with the PIL
    image processor (it hands torch tensors to the PIL processor's numpy `patchify_image`), so its
    `_process_images` steps are taken here with the PIL processor's own pieces: crop the padded
    canvas to the unpadded size rounded up to whole patches, patchify, the processor's replacement
    text (rows of |SPEAKER| + |NEWLINE|, then <s>), then the text with <0x04> (beginning of answer)."""
    from transformers import AutoTokenizer, FuyuProcessor
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ip = FuyuImageProcessorPil.from_pretrained(folder, local_files_only=True)
    proc = FuyuProcessor(image_processor=ip, tokenizer=tok)
    out = ip([image])
    canvas = np.asarray(out["images"][0][0])
    p = ip.patch_size["height"] if isinstance(ip.patch_size, dict) else ip.patch_size.height
    h = min(canvas.shape[-2], math.ceil(out["image_unpadded_heights"][0][0] / p) * p)
    w = min(canvas.shape[-1], math.ceil(out["image_unpadded_widths"][0][0] / p) * p)
    patches = torch.from_numpy(ip.patchify_image(canvas[..., :h, :w]))
    replacement = proc.replace_image_token(None, image_idx=0, num_patches=(h // p) * (w // p), row_width=w // p)
    ids = tok(replacement, add_special_tokens=False)["input_ids"] + tok(text + "<0x04>", add_special_tokens=False)["input_ids"]
    return torch.tensor(ids), patches


def _parity_reference(folder, image, question, prompt, model):
    ref_ids, ref_patches = fuyu_reference(folder, image, question)
    # The image directly before the question gives the same ids as the chat's "<image>\n".
    direct = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>" + question)], [image])
    assert direct.input_ids.tolist() == ref_ids.tolist()
    assert model.count_image_tokens(prompt.images[0]) == int((ref_ids == model.image_token_id).sum()) == ref_patches.shape[0]
    ours_patches = model.vision(prompt.images[0].pixel_values)[0]
    std = torch.tensor(model.config.processor.std).repeat(ours_patches.shape[1] // 3)
    assert ((ours_patches - ref_patches).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    return ref_ids, {"pixel_values": ours_patches}


PARITY = ParityCase("fuyu", save_fuyu, "FuyuForCausalLM", _parity_reference,
                    sizes=((40, 30), (100, 30), (200, 150), (13, 7), (72, 48)))
