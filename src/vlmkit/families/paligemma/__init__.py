"""PaliGemma / PaliGemma 2: a SigLIP tower, one linear layer into a Gemma (2) LLM, the image
squashed to a square (the `fixed` processor, `fit: squash`), and a prefix-LM attention rule
(`model.attention: prefix`): the images and the prompt attend both ways, the answer causally."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.paligemma.hf import PALIGEMMA
from vlmkit.families.paligemma.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="paligemma",
    title="PaliGemma / PaliGemma 2",
    pattern="fixed resolution, linear projection into the LLM's input sequence; prefix-LM attention",
    presets=PRESETS,
    hf=(PALIGEMMA,),
))
