"""GLM-4.1V: native resolution (an image resized as a 2-frame clip to multiples of 28 px within a
pixel budget, 14 px patches), its own ViT with a learned 2D position table resampled to each
image, a 2x2 strided-convolution downsample and a SwiGLU PatchMerger, and a decoder whose
partial rotary embedding is split into M-RoPE sections."""

from vlmkit.families import FamilySpec, register_family_spec
from vlmkit.families.glm4v import model, processor  # noqa: F401  (register the tower, connector, LLMs and the `glm4v` processor)
from vlmkit.families.glm4v.hf import GLM4V
from vlmkit.families.glm4v.presets import PRESETS

SPEC = register_family_spec(FamilySpec(
    name="glm4v",
    title="GLM-4.1V",
    pattern="native resolution: clip-wide smart_resize, 2x2 conv downsample, partial-rotary M-RoPE",
    image_processors=("glm4v",),
    presets=PRESETS,
    hf=(GLM4V,),
    recipe="recipes/families/glm4v.yaml",
))
