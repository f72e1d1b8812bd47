"""Aya Vision: a SigLIP tower, a 2x2 pixel shuffle into a SwiGLU projector (`pixel-shuffle-swiglu`),
a Cohere / Cohere2 decoder (the `hf` LLM), and GotOcr2's
tiling with Aya's tile tags (the `aya_vision` processor)."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.aya_vision import model, processor  # noqa: F401  (register their builders)
from vlmkit.families.aya_vision.hf import AYA_VISION
from vlmkit.families.aya_vision.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="aya_vision",
    title="Aya Vision",
    pattern="tiles + thumbnail, pixel shuffle and a SwiGLU projector into the LLM",
    image_processors=("aya_vision",),
    presets=PRESETS,
    hf=(AYA_VISION,),
))
