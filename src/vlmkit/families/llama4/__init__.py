"""Llama 4: its own ViT with a pixel-shuffle adapter (`llama4-vit`), a bias-free linear projector,
a mixture-of-experts decoder with chunked attention (the `hf` LLM, transformers'
`Llama4ForCausalLM`), and its tiling (`llama4`): 336 px tiles on the best-fitting canvas plus a
global tile."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.llama4 import model, processor  # noqa: F401  (register their builders)
from vlmkit.families.llama4.hf import LLAMA4
from vlmkit.families.llama4.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="llama4",
    title="Llama 4",
    pattern="tiles on the best-fitting canvas + a global tile, pixel shuffle in the tower, a linear projector into a MoE LLM",
    image_processors=("llama4",),
    presets=PRESETS,
    hf=(LLAMA4,),
    recipe="recipes/families/llama4.yaml",
))
