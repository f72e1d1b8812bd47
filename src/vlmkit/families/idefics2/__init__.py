"""Idefics2: each image (or its four quadrants and the whole image) near its own resolution,
read by Idefics2's own vision transformer (the `idefics2-vision` tower) and resampled by a
Perceiver (the lecture's `perceiver` connector: SwiGLU modality projection, latents at the LLM
width) into a fixed number of tokens per view, between `<fake_token_around_image>` boundaries
(the `idefics2` processor)."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.idefics2 import model, processor  # noqa: F401  (register the `idefics2` processor and tower)
from vlmkit.families.idefics2.hf import IDEFICS2
from vlmkit.families.idefics2.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="idefics2",
    title="Idefics2",
    pattern="perceiver resampler: a fixed number of latents per view, in the LLM's input sequence",
    image_processors=("idefics2",),
    presets=PRESETS,
    hf=(IDEFICS2,),
))
