"""Fuyu: no vision encoder. Image patches go through one linear layer straight into the LLM
(the lecture's encoder-free pattern: the `patchify` tower and `patch-embed` connector), one
image token per patch and a newline token after each patch row (the `fuyu` processor)."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.fuyu import processor  # noqa: F401  (registers the `fuyu` image processor)
from vlmkit.families.fuyu.hf import FUYU
from vlmkit.families.fuyu.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="fuyu",
    title="Fuyu",
    pattern="encoder-free: patches through one linear layer into the LLM",
    image_processors=("fuyu",),
    presets=PRESETS,
    hf=(FUYU,),
    recipe="recipes/families/encoder-free.yaml",
))
