"""LLaVA-1.5: a CLIP / SigLIP tower, the 2-layer GELU MLP connector and a causal LM, one
fixed-resolution view per image (the core's `fixed` processor, the lecture's fixed-resolution
pattern), its tokens in the text sequence (prefix fusion)."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.llava.hf import LLAVA
from vlmkit.families.llava.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="llava",
    title="LLaVA-1.5",
    pattern="fixed resolution: one view per image through an MLP into the token sequence",
    presets=PRESETS,
    hf=(LLAVA,),
    recipe="recipes/families/fixed.yaml",
))
