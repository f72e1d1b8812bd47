"""SmolVLM / SmolVLM2: Idefics3's architecture under its own transformers classes (it builds on
`vlmkit.families.idefics3`: the same import, weight map and image processing), plus SmolVLM2's
video layout (the `smolvlm` processor: each sampled frame one global image, a spelled-out frame
count, the duration and a timestamp per frame)."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.smolvlm import processor  # noqa: F401  (registers the `smolvlm` image processor)
from vlmkit.families.smolvlm.hf import SMOLVLM
from vlmkit.families.smolvlm.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="smolvlm",
    title="SmolVLM / SmolVLM2",
    pattern="crops + global view, pixel shuffle into the LLM's input sequence (Idefics3's); video frames as images",
    image_processors=("smolvlm",),
    presets=PRESETS,
    hf=(SMOLVLM,),
))
