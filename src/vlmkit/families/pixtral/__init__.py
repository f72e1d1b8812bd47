"""Pixtral (and Mistral3): native resolution. The image keeps its aspect ratio (longest edge
capped), every patch is one token, `[IMG_BREAK]` after each patch row and `[IMG_END]` last (the
`pixtral` processor); vlmkit's own tower for it is a 2D-RoPE ViT (`rope-vit`)."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.pixtral import model, processor  # noqa: F401  (register the `rope-vit` tower and `pixtral` processor)
from vlmkit.families.pixtral.hf import MISTRAL3, PIXTRAL
from vlmkit.families.pixtral.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="pixtral",
    title="Pixtral",
    pattern="native resolution: one token per patch, a break token after each row",
    image_processors=("pixtral",),
    presets=PRESETS,
    hf=(PIXTRAL, MISTRAL3),
    recipe="recipes/families/pixtral.yaml",
))
