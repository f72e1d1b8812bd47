"""Llama 3.2 Vision (Mllama): up to 4 aspect-ratio tiles per image (the `mllama` processor), read
by gated cross-attention inside the LLM (the lecture's cross-attention pattern); one `<|image|>`
marker per image in the text. Its own parts: the `mllama-vit` tower (reads an image's tiles
together), the `mllama-text` LLM (its own cross-attention layers, with their visibility rule),
the HF import/export and the presets."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.mllama import model, processor  # noqa: F401  (register mllama-vit, mllama-text, the mllama processor)
from vlmkit.families.mllama.hf import MLLAMA
from vlmkit.families.mllama.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="mllama",
    title="Llama 3.2 Vision",
    pattern="cross-attention: tile features read by gated cross-attention layers inside the LLM",
    image_processors=("mllama",),
    presets=PRESETS,
    hf=(MLLAMA,),
    recipe="recipes/families/mllama.yaml",
))
