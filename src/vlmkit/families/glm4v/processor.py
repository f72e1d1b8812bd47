"""GLM-4.1V's preprocessing (transformers' `Glm4vImageProcessorPil`): an image is resized as a
clip of `temporal_patch_size` frames by the clip-wide smart_resize (`video_smart_resize`, the
rule Qwen3-VL's videos follow: a side shorter than one merge window is first scaled up to it,
then multiples of patch x merge with t x h x w within [min_pixels, max_pixels]), cut into 14 px
patches laid out as Qwen2-VL's, and wrapped in `<|begin_of_image|> ... <|end_of_image|>`.

A video (`Glm4vVideoProcessor`'s rule) is a clip resized as a whole, in temporal patches; each
temporal patch is an image block of `<|image|>` slots followed by the whole seconds of its first
frame, and the blocks are wrapped in `<|begin_of_video|> ... <|end_of_video|>`."""

from __future__ import annotations

from vlmkit.families.qwen3_vl.processor import Qwen3VLProcessor, video_smart_resize
from vlmkit.processing.images import CLIP_MEAN, CLIP_STD
from vlmkit.registry import IMAGE_PROCESSORS


class Glm4vProcessor(Qwen3VLProcessor):
    block_start, block_end = "<|begin_of_image|>", "<|end_of_image|>"

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        t = self.temporal_patch_size
        return video_smart_resize(t, height, width, t, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)

    def video_text(self, groups: list[str], timestamps: list[float], duration: float) -> str:
        frames = self.frame_blocks(groups)
        # The first frame's time of each temporal patch, in whole seconds (a short list repeats its last).
        times = list(timestamps[:: self.temporal_patch_size]) or [0.0]
        times += [times[-1]] * (len(frames) - len(times))
        return "<|begin_of_video|>" + "".join(f"{f}{int(s)}" for f, s in zip(frames, times)) + "<|end_of_video|>"


@IMAGE_PROCESSORS.register("glm4v")
def build_glm4v(config, tokens_per_image: int | None = None) -> Glm4vProcessor:
    """`tokens_per_image` is ignored: the count follows from smart_resize."""
    o = dict(config.options)
    return Glm4vProcessor(
        patch_size=o.get("patch_size", 14), merge_size=o.get("merge_size", 2), temporal_patch_size=o.get("temporal_patch_size", 2),
        min_pixels=o.get("min_pixels", 112 * 112), max_pixels=o.get("max_pixels", 28 * 28 * 15000),
        mean=config.mean or CLIP_MEAN, std=config.std or CLIP_STD, resample=config.resample, backend=o.get("backend", "torch"),
        video_min_pixels=o.get("video_min_pixels"), video_max_pixels=o.get("video_max_pixels"))
