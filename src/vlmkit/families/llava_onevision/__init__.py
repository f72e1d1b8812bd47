"""LLaVA-OneVision: LLaVA-NeXT's weights and AnyRes layout with the feature map capped at
anyres_max_N tiles, and base-resolution views (one newline each) for the images of a
multi-image prompt (the `anyres-max` processor)."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.llava_onevision import processor  # noqa: F401  (registers the `anyres-max` image processor)
from vlmkit.families.llava_onevision.hf import LLAVA_ONEVISION

SPEC = register_family_spec(FamilySpec(
    name="llava_onevision",
    title="LLaVA-OneVision",
    pattern="AnyRes with a capped feature map; base views in multi-image prompts",
    image_processors=("anyres-max",),
    hf=(LLAVA_ONEVISION,),
))
