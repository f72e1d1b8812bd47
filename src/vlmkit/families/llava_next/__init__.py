"""LLaVA-NeXT: AnyRes (the core's `anyres` processor: a base view plus the best grid of tiles,
the tile features stitched, unpadded to the image's aspect ratio, a learned newline embedding
after each row) over LLaVA-1.5's tower, MLP connector and causal LM."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.llava_next.hf import LLAVA_NEXT
from vlmkit.families.llava_next.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="llava_next",
    title="LLaVA-NeXT",
    pattern="AnyRes: a base view plus high-resolution tiles, unpadded, with a learned newline per row",
    presets=PRESETS,
    hf=(LLAVA_NEXT,),
    recipe="recipes/families/anyres.yaml",
))
