"""SmolVLM2: Idefics3's image processing (`vlmkit.families.idefics3.processor`), plus video in SmolVLM2's layout.

Follows transformers' `SmolVLMVideoProcessor` / `SmolVLMProcessor`:

* frames are sampled by `video.sampling: smolvlm` (`processing/video.py`);
* each frame is resized so its longest edge is `video_longest_edge` (the other side `int()` of the
  scaled value, bumped to even), then to a `crop x crop` square, and read as one global image:
  `<fake_token_around_image><global-img>` + `image_seq_len` image tokens + `<fake_token_around_image>`;
* the video's text: "You are provided the following series of {N in words} frames from a
  {H:MM:SS} [H:MM:SS] video.\\n", then per frame "\\nFrame from {MM:SS}:" and its image text, then
  "\\n\\n".

transformers resizes video frames with torchvision, which vlmkit never uses; vlmkit resizes them
with PIL (the image processor's Lanczos), so frame pixels follow the image path's rounding.
"""

from __future__ import annotations

from datetime import timedelta

from vlmkit.families.idefics3.processor import Idefics3Processor
from vlmkit.processing.base import ImageProcessor
from vlmkit.registry import IMAGE_PROCESSORS

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000, as num2words writes them ("twenty-one",
    "one hundred and five")."""
    if n < 0 or n >= 1_000_000:
        raise ValueError(f"no words for {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10 - 2] + ("-" + _ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return _ONES[n // 100] + " hundred" + (" and " + number_words(n % 100) if n % 100 else "")
    rest = n % 1000
    return number_words(n // 1000) + " thousand" + ((" and " if rest < 100 else ", ") + number_words(rest) if rest else "")


class SmolVLMProcessor(Idefics3Processor):
    def __init__(self, *args, video_longest_edge: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.video_longest_edge = video_longest_edge or self.crop_size

    def for_video(self) -> ImageProcessor:
        return Idefics3Processor(longest_edge=self.video_longest_edge, crop_size=self.crop_size, patch_size=self.patch_size,
                                 scale_factor=self.scale_factor, do_image_splitting=False, mean=self.mean, std=self.std,
                                 resample=self.resample, backend=self.backend)

    def video_text(self, groups: list[str], timestamps: list[float], duration: float) -> str:
        if len(groups) != len(timestamps):
            raise ValueError("SmolVLM2's video layout needs one token group per sampled frame (video.compression: none)")
        text = (f"You are provided the following series of {number_words(len(groups))} frames from a "
                f"{timedelta(seconds=int(duration))} [H:MM:SS] video.\n")
        for t, group in zip(timestamps, groups):
            text += f"\nFrame from {int(t // 60):02d}:{int(t % 60):02d}:" + group
        return text + "\n\n"


@IMAGE_PROCESSORS.register("smolvlm")
def build_smolvlm(config, tokens_per_image: int | None = None) -> SmolVLMProcessor:
    """Idefics3's options plus `video_longest_edge` (frames' longest edge before the square resize)."""
    o = dict(config.options)
    return SmolVLMProcessor(longest_edge=o.get("longest_edge", 4 * config.image_size), crop_size=config.image_size,
                            patch_size=o.get("patch_size", 14), scale_factor=o.get("scale_factor", 2),
                            do_image_splitting=o.get("do_image_splitting", True), mean=config.mean, std=config.std,
                            resample=o.get("resample", "lanczos"), backend=o.get("backend", "pil"),
                            video_longest_edge=o.get("video_longest_edge"))
