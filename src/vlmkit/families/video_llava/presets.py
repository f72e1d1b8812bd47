"""Video-LLaVA-7B at real shape (two CLIP ViT-L/14 towers at 224 px, LanguageBind's image and
video encoders, sharing one MLP projector into Vicuna-7B), with its tiny CPU variant."""

from __future__ import annotations

from vlmkit.families.llava.presets import LLAVA_STAGES
from vlmkit.presets.parts import CLIP_L_336, VICUNA_7B, processor, tiny, toy
from vlmkit.processing.images import CLIP_MEAN, CLIP_STD

CLIP_L_224 = {**CLIP_L_336, "model_class": "CLIPVisionModel", "config": {**CLIP_L_336["config"], "image_size": 224}}
VIDEO_LLAVA = processor("video-llava", 224, CLIP_MEAN, CLIP_STD, patch_size=14, cls=True, video={"num_frames": 8})


def _tiny() -> dict:
    cfg = tiny("mlp", vision="clip", processor=toy(VIDEO_LLAVA, 32, patch_size=4))
    return {**cfg, "vision": {**cfg["vision"], "name": "image-video-random"}}


PRESETS = (
    {
        "name": "video-llava-7b", "aliases": ["video-llava", "Video-LLaVA-7B"],
        "family": "Video-LLaVA (7B, Vicuna-7B)", "release": "LanguageBind/Video-LLaVA-7B-hf",
        "published": {"total": 7.37e9, "source": "Hugging Face model page LanguageBind/Video-LLaVA-7B-hf (safetensors: 7.37B params)"},
        "vision": CLIP_L_224, "connector": {"name": "mlp", "options": {}}, "llm": VICUNA_7B,
        # The separate video tower: a second CLIP ViT-L/14 at 224 px (LanguageBind's video encoder).
        "extra_params": {"vision": 303_179_776},
        "image": {"size": 224, "grid": [16, 16], "tiles": 1,
                  "note": "an image is 256 tokens (CLS dropped); a video frame 257 (CLS kept), through the video tower"},
        "processor": VIDEO_LLAVA, "tokens_note": "224 px centre crops; 8 frames a video",
        "stages": LLAVA_STAGES, "tiny": _tiny(),
    },
)
