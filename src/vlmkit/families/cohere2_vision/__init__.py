"""Cohere2-Vision: a SigLIP tower read at its output, a 2x2 pixel shuffle into a SwiGLU projector
(Aya Vision's `pixel-shuffle-swiglu`, no LayerNorm), a Cohere2 decoder, and its own tile-canvas
selection with a thumbnail and a line-break token after each view (the `cohere2_vision`
processor)."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.cohere2_vision import processor  # noqa: F401  (registers the `cohere2_vision` image processor)
from vlmkit.families.cohere2_vision.hf import COHERE2_VISION
from vlmkit.families.cohere2_vision.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="cohere2_vision",
    title="Cohere2-Vision",
    pattern="tiles on the least-scaled canvas + thumbnail, pixel shuffle and a SwiGLU projector into Cohere2",
    image_processors=("cohere2_vision",),
    presets=PRESETS,
    hf=(COHERE2_VISION,),
    recipe="recipes/families/cohere2-vision.yaml",
))
