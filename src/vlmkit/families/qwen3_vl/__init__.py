"""Qwen3-VL: native resolution as Qwen2-VL (smart_resize, 16 px patches, 2x2 merge), a ViT with
a learned position grid whose features from several layers enter the decoder (DeepStack: the
last layer's fill the image slots, earlier layers' are added after the first decoder layers),
and a decoder with interleaved M-RoPE. Videos carry a timestamp per temporal patch."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.qwen3_vl import model, processor  # noqa: F401  (register the tower, connector, LLMs and the `qwen3vl` processor)
from vlmkit.families.qwen3_vl.hf import QWEN3_VL
from vlmkit.families.qwen3_vl.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="qwen3_vl",
    title="Qwen3-VL",
    pattern="native resolution: smart_resize, 2x2 patch merge, DeepStack levels, interleaved M-RoPE",
    image_processors=("qwen3vl",),
    presets=PRESETS,
    hf=(QWEN3_VL,),
    recipe="recipes/families/qwen3-vl.yaml",
))
