"""OpenFlamingo: a CLIP tower, a Perceiver resampler to 64 latents per image, and gated
cross-attention blocks inserted into a frozen MPT decoder (the lecture's cross-attention pattern:
the generic `perceiver` connector with `output: memory` and `cross-attention` fusion). vlmkit
has its presets only; there is no transformers class to import from."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.openflamingo.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="openflamingo",
    title="OpenFlamingo",
    pattern="cross-attention: Perceiver latents read by gated cross-attention blocks inside the LLM",
    presets=PRESETS,
))
