"""Pixtral: native resolution with the longest edge capped at 1024 px, 16 px patches, one
`[IMG]` per patch, `[IMG_BREAK]` after each patch row and `[IMG_END]` in place of the last break.

Follows transformers' `PixtralImageProcessor`: when the image exceeds the cap it is scaled by
`max(h/1024, w/1024)` with `floor`; each side then rounds up to whole patches
(`(side - 1) // 16 + 1`), so the resize target is a multiple of 16 (small images are upscaled
by less than one patch, never downscaled).

With `spatial_merge` s > 1 (Mistral3, whose connector merges s x s patches) the unit is
`patch_size * s`, as transformers' `PixtralProcessor` passes it to the image processor: the
image resizes to whole merge blocks and each block is one `[IMG]`.
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from vlmkit.processing.base import ImageProcessor, ProcessedImage, Segment, Slots, Text, TokenLayout, image_views
from vlmkit.processing.images import CLIP_MEAN, CLIP_STD, Resizer, to_normalized
from vlmkit.registry import IMAGE_PROCESSORS


def pixtral_size(height: int, width: int, longest_edge: int = 1024, patch_size: int = 16) -> tuple[int, int]:
    if height <= 0 or width <= 0:
        raise ValueError(f"image has zero size ({width}x{height})")
    ratio = max(height / longest_edge, width / longest_edge)
    if ratio > 1:
        height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
    rows, cols = (height - 1) // patch_size + 1, (width - 1) // patch_size + 1
    return rows * patch_size, cols * patch_size


class PixtralProcessor(ImageProcessor):
    native_resolution = True

    def __init__(
        self,
        longest_edge: int = 1024,
        patch_size: int = 16,
        spatial_merge: int = 1,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        resample: str = "bicubic",
        backend: str = "torch",
    ):
        self.longest_edge, self.patch_size, self.spatial_merge = longest_edge, patch_size, spatial_merge
        self.mean, self.std = tuple(mean), tuple(std)
        self.resample, self.backend = resample, backend

    def layout(self, width: int, height: int) -> TokenLayout:
        unit = self.patch_size * self.spatial_merge
        rh, rw = pixtral_size(height, width, self.longest_edge, unit)
        rows, cols = rh // unit, rw // unit
        return TokenLayout(
            visual_tokens=rows * cols,
            parts={"resized": [rw, rh], "grid": [rows, cols], "img_break": rows - 1, "img_end": 1},
            special_tokens=rows,
        )

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """(1, 3, H, W) float32, H and W multiples of the patch size (times the spatial merge)."""
        rh, rw = pixtral_size(image.size[1], image.size[0], self.longest_edge, self.patch_size * self.spatial_merge)
        u8 = Resizer(image, self.resample, self.backend).resize(rh, rw)
        return to_normalized(u8, self.mean, self.std, exact=self.backend == "pil").unsqueeze(0)

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        layout = self.layout(*image.size)
        pixels = self.pixels(image)
        return ProcessedImage(pixel_values=pixels, layout=layout,
                              extra={"image_size": tuple(layout.parts["resized"][::-1])},
                              views=image_views(pixels, ["image"]), image_size=(image.size[1], image.size[0]))

    def segments(self, layout: TokenLayout) -> tuple[Segment, ...]:
        rows, cols = layout.parts["grid"]
        out: list[Segment] = []
        for r in range(rows):
            out += [Slots(cols), Text("[IMG_BREAK]" if r < rows - 1 else "[IMG_END]")]
        return tuple(out)

    def placeholder_text(self, layout: TokenLayout, image_token: str = "[IMG]") -> str:
        return super().placeholder_text(layout, image_token)


@IMAGE_PROCESSORS.register("pixtral")
def build_pixtral(config, tokens_per_image: int | None = None) -> PixtralProcessor:
    """`tokens_per_image` is ignored: the count follows from the resized size."""
    o = dict(config.options)
    return PixtralProcessor(
        longest_edge=o.get("longest_edge", config.image_size),
        patch_size=o.get("patch_size", 16),
        spatial_merge=o.get("spatial_merge", 1),
        mean=config.mean,
        std=config.std,
        resample=config.resample,
        backend=o.get("backend", "torch"),
    )
