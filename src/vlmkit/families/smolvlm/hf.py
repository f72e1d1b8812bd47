"""SmolVLM / SmolVLM2 (`smolvlm`, transformers' `SmolVLMForConditionalGeneration`).

SmolVLM is Idefics3's architecture under its own classes: the same vision transformer (SigLIP's,
kept here as transformers' own `smolvlm_vision` model, which also marks the export format), the
same pixel shuffle plus one bias-free linear layer, any causal LM, and the same image splitting
and prompt layout. The import and the weight mapping are therefore Idefics3's
(`vlmkit.families.idefics3.hf`: `import_idefics3` / `idefics3_reference`), with the `idefics3` processor family.

Export writes SmolVLM's files: config and weights, `SmolVLMImageProcessorPil`'s
`preprocessor_config.json`, the tokenizer, the chat template and a `processor_config.json`
naming `SmolVLMProcessor` with its `image_seq_len`. (`SmolVLMProcessor` itself cannot be built
without torchvision, which its video processor needs, and num2words, so its files are written
directly.)

Video: the `smolvlm` processor family (`processor.py` beside this module) reads `<video>` prompts in
SmolVLM2's layout (spelled-out frame count, duration, a timestamp per frame, each frame one global
image), with SmolVLM2's frame sampler (`video.sampling: smolvlm`) and the folder's fps, max frames
and frame size (`video_sampling`). transformers' video processor resizes frames with torchvision,
which vlmkit never uses: vlmkit resizes them as the image path does (PIL).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmkit.families.idefics3.hf import idefics3_reference, import_idefics3
from vlmkit.families.smolvlm.processor import SmolVLMProcessor
from vlmkit.hf.folder import image_processor_settings, read_json
from vlmkit.hf.registry import HFFamily
from vlmkit.hf.templates import plain_template
from vlmkit.hf.writing import atomic_folder
from vlmkit.model.vision import HFVisionTower

TOWER = "smolvlm_vision"


def video_settings(folder: Path) -> dict:
    """SmolVLM2's video sampling (fps, max frames, frames' longest edge) from wherever the folder
    keeps it: the image processor's `video_sampling`, `video_preprocessor_config.json`, or the
    processor's nested `video_processor`; {} when it has none."""
    folder = Path(folder)
    sampling = image_processor_settings(folder).get("video_sampling")
    if sampling:
        return {"fps": sampling.get("fps"), "max_frames": sampling.get("max_frames"),
                "longest_edge": (sampling.get("video_size") or {}).get("longest_edge")}
    video = read_json(folder / "video_preprocessor_config.json") or read_json(folder / "processor_config.json").get("video_processor") or {}
    if not video:
        return {}
    sampling = video.get("video_sampling") or {}
    return {"fps": sampling.get("fps", video.get("fps")), "max_frames": sampling.get("max_frames", video.get("num_frames")),
            "longest_edge": (sampling.get("video_size") or video.get("size") or {}).get("longest_edge")}


def import_smolvlm(folder: Path, out: Path) -> Path:
    video = video_settings(folder)
    options = {}
    if video.get("longest_edge"):
        options["video_longest_edge"] = int(video["longest_edge"])
    sampling = {"sampling": "smolvlm", "compression": "none"}
    if video.get("fps"):
        sampling["fps"] = float(video["fps"])
    if video.get("max_frames"):
        sampling["max_frames"] = int(video["max_frames"])
    options["video"] = sampling
    return import_idefics3(folder, out, tower=TOWER, processor="smolvlm", processor_options=options)


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

    video = o.get("video") or {}
    sampling = {"fps": video.get("fps", 1.0), "max_frames": video.get("max_frames", 32),
                "video_size": {"longest_edge": (model.image_processor.video_longest_edge if isinstance(model.image_processor, SmolVLMProcessor)
                                                else p.image_size)}}

    def write(tmp: Path) -> None:
        ref.save_pretrained(tmp, safe_serialization=True)
        image_processor.save_pretrained(tmp)
        settings = json.loads((tmp / "preprocessor_config.json").read_text())
        (tmp / "preprocessor_config.json").write_text(json.dumps(settings | {"video_sampling": sampling}, indent=2))
        tok.save_pretrained(tmp)
        template = plain_template(tok)
        if template:
            (tmp / "chat_template.jinja").write_text(template)
        (tmp / "processor_config.json").write_text(json.dumps(
            {"processor_class": "SmolVLMProcessor", "image_seq_len": model.image_processor.image_seq_len}, indent=2))

    return atomic_folder(Path(out), write)


def _owns(model) -> bool:
    return (model.config.processor.name in ("idefics3", "smolvlm") and isinstance(model.vision, HFVisionTower)
            and getattr(model.vision.model.config, "model_type", "") == TOWER)


def _reference(model, prompt, ids):
    from transformers import SmolVLMForConditionalGeneration

    return SmolVLMForConditionalGeneration, {"pixel_values": torch.cat([im.pixel_values for im in prompt.images])[None]}


SMOLVLM = HFFamily(("smolvlm",), "SmolVLM / SmolVLM2 (SmolVLMForConditionalGeneration)", import_smolvlm, export_smolvlm,
                   _owns, _reference, specificity=9)
