"""Fuyu: the image at its own size (scaled down, aspect kept, only when it exceeds the
`max_height` x `max_width` canvas), padded bottom and right to whole patches, cut into
`patch_size` patches that go straight into the LLM (the encoder-free `patchify` tower and
`patch-embed` connector). One image token per patch, a newline token after every patch row, and
an end text after the image (Fuyu's processor writes its BOS `<s>` there).

Follows transformers' `FuyuImageProcessor` / `FuyuProcessor`: the scale is
`min(max_h / h, max_w / w)` with `int()` sides; the model reads the patches of the unpadded
region rounded up to whole patches (`ceil(side / p) * p`), the rest of that region holding the
padding value (`pad_value`, in 0-255 pixel units before rescaling: transformers pads with 1.0
before it rescales).
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from vlmkit.processing.base import ImageProcessor, ProcessedImage, Segment, Slots, Text, TokenLayout, image_views
from vlmkit.processing.images import Resizer, to_normalized
from vlmkit.registry import IMAGE_PROCESSORS


def fuyu_size(height: int, width: int, max_height: int, max_width: int) -> tuple[int, int]:
    """The resized (height, width): unchanged when it fits the canvas, else scaled down to fit."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image has zero size ({width}x{height})")
    if height <= max_height and width <= max_width:
        return height, width
    scale = min(max_height / height, max_width / width)
    return max(1, int(height * scale)), max(1, int(width * scale))


class FuyuProcessor(ImageProcessor):
    def __init__(self, max_height: int = 1080, max_width: int = 1920, patch_size: int = 30, mean=(0.5,) * 3, std=(0.5,) * 3,
                 resample: str = "bilinear", pad_value: float = 1.0, newline: str = "|NEWLINE|", end: str = "<s>",
                 backend: str = "pil"):
        if max_height % patch_size or max_width % patch_size:
            raise ValueError(f"fuyu: the canvas {max_width}x{max_height} is not a multiple of the patch size {patch_size}")
        self.max_height, self.max_width, self.patch_size = max_height, max_width, patch_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.resample, self.pad_value, self.newline, self.end, self.backend = resample, pad_value, newline, end, backend

    def layout(self, width: int, height: int) -> TokenLayout:
        rh, rw = fuyu_size(height, width, self.max_height, self.max_width)
        p = self.patch_size
        rows, cols = math.ceil(rh / p), math.ceil(rw / p)
        return TokenLayout(visual_tokens=rows * cols,
                           parts={"resized": [rw, rh], "padded": [cols * p, rows * p], "grid": [rows, cols]},
                           special_tokens=rows + (1 if self.end else 0))

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        layout = self.layout(*image.size)
        rw, rh = layout.parts["resized"]
        pw, ph = layout.parts["padded"]
        u8 = Resizer(image, self.resample, self.backend).resize(rh, rw)
        pixels = to_normalized(u8.contiguous(), self.mean, self.std, exact=True)
        if (pw, ph) != (rw, rh):
            fill = to_normalized(torch.full((3, 1, 1), 0, dtype=torch.uint8), self.mean, self.std, exact=True)
            # The padding value is in pixel units before rescaling: (v / 255 - mean) / std.
            fill = fill + torch.tensor([self.pad_value / 255 / s for s in self.std]).view(3, 1, 1)
            canvas = fill.expand(3, ph, pw).clone()
            canvas[:, :rh, :rw] = pixels
            pixels = canvas
        pixels = pixels.unsqueeze(0)
        return ProcessedImage(pixel_values=pixels, layout=layout, views=image_views(pixels, ["image"]),
                              image_size=(image.size[1], image.size[0]))

    def segments(self, layout: TokenLayout) -> tuple[Segment, ...]:
        rows, cols = layout.parts["grid"]
        out: list[Segment] = []
        for _ in range(rows):
            out += [Slots(cols), Text(self.newline)]
        if self.end:
            out.append(Text(self.end))
        return tuple(out)


@IMAGE_PROCESSORS.register("fuyu")
def build_fuyu(config, tokens_per_image: int | None = None) -> FuyuProcessor:
    """`tokens_per_image` is ignored: the count follows from the image's size. `image_size` is
    the canvas height unless `options.max_height` says otherwise."""
    o = dict(config.options)
    return FuyuProcessor(max_height=o.get("max_height", config.image_size), max_width=o.get("max_width", config.image_size),
                         patch_size=o.get("patch_size", 30), mean=config.mean, std=config.std, resample=config.resample,
                         pad_value=o.get("pad_value", 1.0), newline=o.get("newline", "|NEWLINE|"), end=o.get("end", "<s>"),
                         backend=o.get("backend", "pil"))
