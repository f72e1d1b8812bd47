"""LFM2-VL: a SigLIP2 NaFlex tower reading each view at its own size (`siglip2-naflex`), a 2x2
pixel unshuffle into a LayerNorm + MLP projector (the core `pixel-shuffle` connector), an LFM2
decoder of short-convolution and attention layers (the `hf` LLM), and its own processor
(`lfm2_vl`): native resolution within a token budget, 512 px tiles plus a thumbnail for large
images."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.lfm2_vl import model, processor  # noqa: F401  (register their builders)
from vlmkit.families.lfm2_vl.hf import LFM2_VL
from vlmkit.families.lfm2_vl.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="lfm2_vl",
    title="LFM2-VL",
    pattern="native-resolution views (tiles + thumbnail when large), pixel unshuffle and an MLP into a hybrid conv/attention LLM",
    image_processors=("lfm2_vl",),
    presets=PRESETS,
    hf=(LFM2_VL,),
    recipe="recipes/families/lfm2-vl.yaml",
))
