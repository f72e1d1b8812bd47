"""LLaVA-NeXT-Video-7B at real shape (CLIP ViT-L/14-336 + Vicuna-7B, LLaVA-NeXT's AnyRes for
images, 336 px frames average-pooled 2x2: 144 tokens a frame), with its tiny CPU variant."""

from __future__ import annotations

from vlmkit.families.llava.presets import LLAVA_STAGES
from vlmkit.presets.parts import CLIP_L_336, VICUNA_7B, processor, tiny, toy
from vlmkit.processing.images import CLIP_MEAN, CLIP_STD

LLAVA_NEXT_VIDEO = processor("anyres-video", 336, CLIP_MEAN, CLIP_STD, video_pool=["average", 2], video={"num_frames": 8})
# Toy sizes: 32 px tiles and frames, 4 px patches (an 8x8 feature grid, 4x4 once pooled).
TINY = {"patch_size": 4, "grid_pinpoints": [[32, 64], [64, 32], [64, 64]]}

PRESETS = (
    {
        "name": "llava-next-video-7b", "aliases": ["llava-next-video", "LLaVA-NeXT-Video-7B"],
        "family": "LLaVA-NeXT-Video (7B, Vicuna-7B)", "release": "llava-hf/LLaVA-NeXT-Video-7B-hf",
        "published": {"total": 7.06e9, "source": "Hugging Face model page llava-hf/LLaVA-NeXT-Video-7B-hf (safetensors: 7.06B params)"},
        "vision": CLIP_L_336, "connector": {"name": "mlp", "options": {}}, "llm": VICUNA_7B,
        # The learned row-newline embedding of the image path.
        "extra_params": {"connector": 4096},
        "image": {"size": 336, "grid": [24, 24], "tiles": 1,
                  "note": "per 336 px tile; AnyRes adds tiles + newline tokens; a video frame is 12x12 = 144 tokens after 2x2 pooling"},
        "processor": LLAVA_NEXT_VIDEO, "tokens_note": "llava-v1.6 pinpoints, 336 px tiles; 336 px frames pooled 2x2",
        "stages": LLAVA_STAGES, "tiny": tiny("mlp", vision="clip", processor=toy(LLAVA_NEXT_VIDEO, 32, **TINY)),
    },
)
