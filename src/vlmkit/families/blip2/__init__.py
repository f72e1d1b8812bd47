"""BLIP-2 and InstructBLIP: a ViT (`hf-blip`, transformers' own BLIP vision model) read by the
lecture's Q-Former connector (`qformer`, generic, in the core): N learned queries reach the LLM as
prefix tokens, whatever the image. InstructBLIP's Q-Former also reads the instruction (the
connector's `reads_instruction`). The folder holds the tower (model.py), the HF import/export and the presets."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.blip2 import model  # noqa: F401  (registers the `hf-blip` vision tower)
from vlmkit.families.blip2.hf import BLIP2, INSTRUCTBLIP
from vlmkit.families.blip2.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="blip2",
    title="BLIP-2 / InstructBLIP",
    pattern="learned queries: a Q-Former reads the image (and, for InstructBLIP, the instruction) into N prefix tokens",
    presets=PRESETS,
    hf=(BLIP2, INSTRUCTBLIP),
    recipe="recipes/families/qformer.yaml",
))
