"""Qwen2-VL and Qwen2.5-VL: native resolution. Each image is resized to multiples of 28 px within
a pixel budget (smart_resize) and cut into 14 px patches (the `qwen2vl` processor), a ViT with 2D
rotary positions reads them (`qwen2-vit`, `qwen2.5-vit`), its 2x2 PatchMerger is the pre-norm
`pixel-shuffle` connector, and the decoder numbers positions in 3D (M-RoPE, `qwen2-vl-text`).
Videos go in as temporal patches of 2 frames."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.qwen2_vl import model, processor  # noqa: F401  (register the towers, LLMs and the `qwen2vl` processor)
from vlmkit.families.qwen2_vl.hf import QWEN2_VL
from vlmkit.families.qwen2_vl.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="qwen2_vl",
    title="Qwen2-VL / Qwen2.5-VL",
    pattern="native resolution: smart_resize, 2x2 patch merge, M-RoPE positions",
    image_processors=("qwen2vl",),
    presets=PRESETS,
    hf=(QWEN2_VL,),
    recipe="recipes/families/qwen2-vl.yaml",
))
