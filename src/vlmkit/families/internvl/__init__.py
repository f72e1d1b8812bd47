"""InternVL: dynamic high-resolution tiling (1..max_num tiles chosen by aspect ratio, plus a
thumbnail; the `dynamic` processor), a 2x2 pixel shuffle with a LayerNorm and an MLP, any causal LM."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.internvl import processor  # noqa: F401  (registers the `dynamic` image processor)
from vlmkit.families.internvl.hf import INTERNVL
from vlmkit.families.internvl.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="internvl",
    title="InternVL",
    pattern="dynamic tiling by aspect ratio plus a thumbnail, pixel shuffle",
    image_processors=("dynamic",),
    presets=PRESETS,
    hf=(INTERNVL,),
    recipe="recipes/families/internvl.yaml",
))
