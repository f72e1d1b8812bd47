"""GLM-4.1V's preprocessing (transformers' `Glm4vImageProcessorPil`): an image is resized as a
clip of `temporal_patch_size` frames by the clip-wide smart_resize (`video_smart_resize`, the
rule Qwen3-VL's videos follow: a side shorter than one merge window is first scaled up to it,
then multiples of patch x merge with t x h x w within [min_pixels, max_pixels]), cut into 14 px
patches laid out as Qwen2-VL's, and wrapped in `<|begin_of_image|> ... <|end_of_image|>`."""

from __future__ import annotations

from vlmkit.families.qwen2_vl.processor import Qwen2VLProcessor
from vlmkit.families.qwen3_vl.processor import video_smart_resize
from vlmkit.processing.base import Segment, Slots, Text, TokenLayout
from vlmkit.processing.images import CLIP_MEAN, CLIP_STD
from vlmkit.registry import IMAGE_PROCESSORS


class Glm4vProcessor(Qwen2VLProcessor):
    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        t = self.temporal_patch_size
        return video_smart_resize(t, height, width, t, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)

    def for_video(self) -> Glm4vProcessor:
        raise ValueError("GLM-4.1V videos are not supported by vlmkit yet (images only)")

    def segments(self, layout: TokenLayout) -> tuple[Segment, ...]:
        return Text("<|begin_of_image|>"), Slots(layout.visual_tokens), Text("<|end_of_image|>")


@IMAGE_PROCESSORS.register("glm4v")
def build_glm4v(config, tokens_per_image: int | None = None) -> Glm4vProcessor:
    """`tokens_per_image` is ignored: the count follows from smart_resize."""
    o = dict(config.options)
    return Glm4vProcessor(
        patch_size=o.get("patch_size", 14), merge_size=o.get("merge_size", 2), temporal_patch_size=o.get("temporal_patch_size", 2),
        min_pixels=o.get("min_pixels", 112 * 112), max_pixels=o.get("max_pixels", 28 * 28 * 15000),
        mean=config.mean or CLIP_MEAN, std=config.std or CLIP_STD, resample=config.resample, backend=o.get("backend", "torch"))
