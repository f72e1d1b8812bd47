"""Ovis2: an AIMv2 ViT, a visual tokenizer that turns each (2x2-folded) patch into a probability
vector over a visual vocabulary and embeds it as the weighted sum of a visual embedding table
(the core `visual-embedding-table` connector, whose last rows embed the image-structure
tokens), a Qwen2 decoder, and Ovis2's covering-area tiling with a thumbnail first (the `ovis2`
processor)."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.ovis2 import processor  # noqa: F401  (registers the `ovis2` image processor)
from vlmkit.families.ovis2.hf import OVIS2
from vlmkit.families.ovis2.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="ovis2",
    title="Ovis2",
    pattern="covering-area tiles + thumbnail; visual tokens as probabilities over a visual embedding table",
    image_processors=("ovis2",),
    presets=PRESETS,
    hf=(OVIS2,),
    recipe="recipes/families/ovis2.yaml",
))
