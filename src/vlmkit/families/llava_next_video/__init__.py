"""LLaVA-NeXT-Video: LLaVA-NeXT (AnyRes images over a CLIP tower, MLP projector, causal LM) plus
video: each sampled frame a square crop through the same tower, its feature map pooled 2x2
(`View.pool`, `model/feature_pool.py`) before the projector, the frames' tokens in the `<video>`
slots (the `anyres-video` processor)."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.llava_next_video import processor  # noqa: F401  (registers the `anyres-video` image processor)
from vlmkit.families.llava_next_video.hf import LLAVA_NEXT_VIDEO
from vlmkit.families.llava_next_video.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="llava_next_video",
    title="LLaVA-NeXT-Video",
    pattern="AnyRes images; video frames through the same tower, features pooled 2x2 before the projector",
    image_processors=("anyres-video",),
    presets=PRESETS,
    hf=(LLAVA_NEXT_VIDEO,),
    recipe="recipes/families/llava-next-video.yaml",
))
