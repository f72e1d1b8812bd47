"""LLaVA-OneVision: AnyRes with a cap on the feature map (anyres_max_N), and base-resolution
images in multi-image prompts.

Follows transformers' `LlavaOnevisionImageProcessor` / `LlavaOnevisionProcessor` and the model's
`pack_image_features`:

* one image in the sample: LLaVA-NeXT's AnyRes (`processing/anyres.py`: pinpoint, centred tiles, squashed
  base view first, unpadding, a newline per feature row), except that an unpadded feature map
  whose area exceeds 1.1x that of `max_tiles` tiles is resized (bilinear, on the projected
  features) to `int(rows // r) x int(cols // r)`, `r = sqrt(rows * cols / (max_tiles * p * p))`,
  `p` the per-tile feature side (the model's assembler does the resize; see `model/assembly.py`);
* several images in the sample: each image is padded to a square with the mean colour
  (`int(mean * 255)` per channel, centred), resized to the tile size, and read as that one view
  followed by one newline embedding: `p * p + 1` tokens.
"""

from __future__ import annotations

import torch
from PIL import Image

from vlmkit.processing.anyres import AnyResProcessor, max_tiles_size, select_best_resolution, unpadded_grid
from vlmkit.processing.base import Arrangement, ImageProcessor, ProcessedImage, TokenLayout, image_views
from vlmkit.processing.images import Resizer, normalize_into
from vlmkit.registry import IMAGE_PROCESSORS


def max_tiles_grid(height: int, width: int, tile_grid: int, max_tiles: int) -> tuple[int, int]:
    return max_tiles_size(height, width, tile_grid, max_tiles)


def onevision_pinpoints(tile: int) -> list[list[int]]:
    """LLaVA-OneVision's default grid: every 1..6 x 1..6 tiles."""
    return [[tile * i, tile * j] for i in range(1, 7) for j in range(1, 7)]


class AnyResMaxProcessor(AnyResProcessor):
    def __init__(self, *args, max_tiles: int = 9, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.unpad or not self.newline or self.pixel_shuffle != 1 or self.base_size != self.image_size:
            raise ValueError("anyres-max keeps LLaVA-OneVision's unpadding, newlines, base view at the tile size and no pixel shuffle")
        if max_tiles < 0:
            raise ValueError(f"max_tiles must be >= 0 (0: no limit), got {max_tiles}")
        self.max_tiles = max_tiles

    def layout(self, width: int, height: int) -> TokenLayout:
        base = super().layout(width, height)
        p = self.image_size // self.patch_size
        feat_h, feat_w = max_tiles_grid(*base.parts["feature_grid"], p, self.max_tiles)
        parts = dict(base.parts, feature_grid=[feat_h, feat_w], tile_tokens=feat_h * feat_w, newline_tokens=feat_h,
                     max_tiles=self.max_tiles)
        return TokenLayout(visual_tokens=parts["base_tokens"] + feat_h * (feat_w + 1), parts=parts)

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        out = super().preprocess(image)
        rows, cols = out.layout.parts["grid"]
        out.layout = self.layout(*image.size)
        out.arrangement = Arrangement("anyres", tiles=(rows, cols), first_tile=1, unpad=True, newline=True, max_tiles=self.max_tiles)
        return out

    def for_sample(self, n_images: int) -> ImageProcessor:
        return self if n_images <= 1 else BaseViewProcessor(self)


class BaseViewProcessor(ImageProcessor):
    """One image of a multi-image LLaVA-OneVision prompt: padded to a square with the mean
    colour, resized to the tile size, then one newline."""

    def __init__(self, parent: AnyResMaxProcessor):
        self.parent = parent

    def layout(self, width: int, height: int) -> TokenLayout:
        if width <= 0 or height <= 0:
            raise ValueError(f"image has zero size ({width}x{height})")
        p = self.parent.image_size // self.parent.patch_size
        return TokenLayout(visual_tokens=p * p + 1, parts={"base_image": [self.parent.image_size] * 2, "base_tokens": p * p,
                                                          "newline_tokens": 1, "multi_image": True})

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        par = self.parent
        w, h = image.size
        if image.mode != "RGB":
            image = image.convert("RGB")
        if w != h:
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in par.mean))
            canvas.paste(image, ((side - w) // 2, (side - h) // 2))
            image = canvas
        s = par.image_size
        pixels = torch.empty((1, 3, s, s), dtype=torch.float32)
        normalize_into(Resizer(image, par.resample, par.backend).resize(s, s), pixels[0], par.mean, par.std, par.backend == "pil")
        return ProcessedImage(pixel_values=pixels, layout=self.layout(w, h), extra={"image_size": (h, w)},
                              views=image_views(pixels, ["image"]), image_size=(h, w), arrangement=Arrangement("newline"))


@IMAGE_PROCESSORS.register("anyres-max")
def build_anyres_max(config, tokens_per_image: int | None = None) -> AnyResMaxProcessor:
    """`tokens_per_image` is ignored: the count depends on the image size (and on the number of
    images in the prompt)."""
    o = dict(config.options)
    return AnyResMaxProcessor(image_size=config.image_size, patch_size=o.get("patch_size", 14),
                              grid_pinpoints=o.get("grid_pinpoints") or onevision_pinpoints(config.image_size), mean=config.mean, std=config.std,
                              resample=config.resample, backend=o.get("backend", "torch"), max_tiles=o.get("max_tiles", 9))


__all__ = ["AnyResMaxProcessor", "BaseViewProcessor", "select_best_resolution", "unpadded_grid"]
