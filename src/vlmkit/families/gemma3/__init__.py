"""Gemma 3: a SigLIP tower, average pooling to `mm_tokens_per_image` tokens with Gemma's RMSNorm
and one linear layer (the `pooling` connector), the image squashed to a square between
start / end-of-image text (the `fixed` processor), and each image's tokens attending to each
other (`model.attention: image`). It shares PaliGemma's Gemma import helpers."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.gemma3.hf import GEMMA3

SPEC = register_family_spec(FamilySpec(
    name="gemma3",
    title="Gemma 3",
    pattern="fixed resolution, pooled tokens into the LLM's input sequence; bidirectional attention within each image",
    hf=(GEMMA3,),
))
