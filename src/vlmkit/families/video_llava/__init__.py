"""Video-LLaVA: an image tower and a separate video tower of the same shape, one shared MLP
projector and a causal LM; frames (views of role `frame`) take the tower's frame path
(`VisionTower.encode_frames`) with their CLS token kept, and fill the `<video>` slots."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.video_llava import model, processor  # noqa: F401  (register the towers and the `video-llava` processor)
from vlmkit.families.video_llava.hf import VIDEO_LLAVA
from vlmkit.families.video_llava.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="video_llava",
    title="Video-LLaVA",
    pattern="fixed 224 px crops; a separate video tower for frames, one shared projector",
    image_processors=("video-llava",),
    presets=PRESETS,
    hf=(VIDEO_LLAVA,),
    recipe="recipes/families/video-llava.yaml",
))
