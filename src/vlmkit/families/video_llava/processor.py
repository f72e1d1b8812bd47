"""Video-LLaVA's preprocessing: images and video frames alike resized short side first and
centre-cropped (transformers' `VideoLlavaImageProcessor` and `VideoLlavaVideoProcessor`, the
rule of `families/llava_next_video/processor.py`); an image is one `image` view (grid tokens,
CLS dropped), a frame one `frame` view for the video tower (grid + 1 tokens, CLS kept)."""

from __future__ import annotations

from vlmkit.families.llava_next_video.processor import CenterCropProcessor
from vlmkit.processing.base import ImageProcessor
from vlmkit.registry import IMAGE_PROCESSORS


class VideoLlavaProcessor(CenterCropProcessor):
    def __init__(self, *args, frames: CenterCropProcessor, **kwargs):
        super().__init__(*args, **kwargs)
        self.frames = frames

    def for_video(self) -> ImageProcessor:
        return self.frames


@IMAGE_PROCESSORS.register("video-llava")
def build_video_llava(config, tokens_per_image: int | None = None) -> VideoLlavaProcessor:
    """Options: `patch_size` (the towers'), `cls` (whether they have a CLS token: a frame keeps it)."""
    o = dict(config.options)
    s, grid = config.image_size, (config.image_size // o.get("patch_size", 14)) ** 2
    backend = o.get("backend", "torch")
    frames = CenterCropProcessor(s, grid + int(o.get("cls", True)), config.mean, config.std, config.resample, backend, role="frame")
    return VideoLlavaProcessor(s, grid, config.mean, config.std, config.resample, backend, frames=frames)
