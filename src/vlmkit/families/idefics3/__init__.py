"""Idefics3 (and SmolVLM v1 folders, which use its classes): the longest edge resized to a fixed
size, split into encoder-size crops plus a global view (the `idefics3` processor), a SigLIP
tower, and a pixel shuffle with one bias-free linear layer (the lecture's `pixel-shuffle`
connector) into any causal LM."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.idefics3 import processor  # noqa: F401  (registers the `idefics3` image processor)
from vlmkit.families.idefics3.hf import IDEFICS3
from vlmkit.families.idefics3.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="idefics3",
    title="Idefics3",
    pattern="crops + global view, pixel shuffle into the LLM's input sequence",
    image_processors=("idefics3",),
    presets=PRESETS,
    hf=(IDEFICS3,),
    recipe="recipes/families/idefics3.yaml",
))
