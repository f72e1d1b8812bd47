"""SmolVLM / SmolVLM2 (`smolvlm`, transformers' `SmolVLMForConditionalGeneration`).

SmolVLM is Idefics3's architecture under its own classes: the same vision transformer (SigLIP's,
kept here as transformers' own `smolvlm_vision` model, which also marks the export format), the
same pixel shuffle plus one bias-free linear layer, any causal LM, and the same image splitting
and prompt layout. The import and the weight mapping are therefore Idefics3's
(`hf_import.import_idefics3` / `idefics3_reference`), with the `idefics3` processor family.

Export writes SmolVLM's files: config and weights, `SmolVLMImageProcessorPil`'s
`preprocessor_config.json`, the tokenizer, the chat template and a `processor_config.json`
naming `SmolVLMProcessor` with its `image_seq_len`. (`SmolVLMProcessor` itself cannot be built
without torchvision, which its video processor needs, and num2words, so its files are written
directly.)

Video: SmolVLM2's video processor resizes frames with torchvision; vlmkit does not import video
prompts in SmolVLM's own layout (frame timestamps, the spelled-out frame count), so an imported
SmolVLM2 reads images only (any number per prompt).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmkit.hf_import import (HFFamily, _atomic_folder, _plain_template, idefics3_reference, import_idefics3,
                              register_family)

TOWER = "smolvlm_vision"


def import_smolvlm(folder: Path, out: Path) -> Path:
    return import_idefics3(folder, out, tower=TOWER)


@torch.no_grad()
def export_smolvlm(model, out: str | Path) -> Path:
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    ref = idefics3_reference(model, SmolVLMConfig, SmolVLMForConditionalGeneration, TOWER)
    tok = model.tokenizer
    p, o = model.config.processor, model.config.processor.options
    resample = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}[o.get("resample", "lanczos")]
    image_processor = SmolVLMImageProcessorPil(size={"longest_edge": o.get("longest_edge", 4 * p.image_size)},
                                               max_image_size={"longest_edge": p.image_size}, resample=resample,
                                               do_image_splitting=o.get("do_image_splitting", True),
                                               image_mean=list(p.mean), image_std=list(p.std))

    def write(tmp: Path) -> None:
        ref.save_pretrained(tmp, safe_serialization=True)
        image_processor.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        template = _plain_template(tok)
        if template:
            (tmp / "chat_template.jinja").write_text(template)
        (tmp / "processor_config.json").write_text(json.dumps(
            {"processor_class": "SmolVLMProcessor", "image_seq_len": model.image_processor.image_seq_len}, indent=2))

    return _atomic_folder(Path(out), write)


def _owns(model) -> bool:
    from vlmkit.model.vision import HFVisionTower

    return (model.config.processor.name == "idefics3" and isinstance(model.vision, HFVisionTower)
            and getattr(model.vision.model.config, "model_type", "") == TOWER)


def _reference(model, prompt, ids):
    from transformers import SmolVLMForConditionalGeneration

    return SmolVLMForConditionalGeneration, {"pixel_values": torch.cat([im.pixel_values for im in prompt.images])[None]}


register_family(HFFamily(("smolvlm",), "SmolVLM / SmolVLM2 (SmolVLMForConditionalGeneration)", import_smolvlm, export_smolvlm,
                         _owns, _reference))
