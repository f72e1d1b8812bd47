"""Fixed-resolution preprocessing (LLaVA-1.5 style): one square image per input image."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image

from vlmkit.processing.base import ImageProcessor, ProcessedImage, Slots, Text, TokenLayout, image_views
from vlmkit.registry import IMAGE_PROCESSORS

RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def normalize(img: Image.Image, mean, std) -> torch.Tensor:
    """uint8 HWC RGB -> float CHW, (x/255 - mean) / std."""
    arr = np.asarray(img, dtype=np.float32)
    scale = (1.0 / (255.0 * np.asarray(std, dtype=np.float32)))
    shift = np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)
    out = arr * scale - shift
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's expand2square: pad the short side symmetrically with the mean colour."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


class FixedResizeProcessor(ImageProcessor):
    """Resize every image to `image_size` x `image_size`.

    `fit="pad"` pads to a square with the mean colour first (LLaVA-1.5), `"squash"` ignores the
    aspect ratio, `"crop"` resizes the short side and centre-crops (CLIP's own processor).
    """

    def __init__(
        self,
        image_size: int,
        tokens_per_image: int,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        resample: str = "bicubic",
        fit: Literal["pad", "squash", "crop"] = "pad",
        before: str = "",
        after: str = "",
    ):
        if image_size <= 0 or tokens_per_image <= 0:
            raise ValueError("image_size and tokens_per_image must be positive")
        self.image_size = image_size
        self.tokens_per_image = tokens_per_image
        self.mean, self.std = tuple(mean), tuple(std)
        self.resample = RESAMPLE[resample]
        self.fit = fit
        # Separator text around each image's slots (Gemma 3: "\n\n<start_of_image>" ... "<end_of_image>\n\n").
        self.before, self.after = before, after

    def layout(self, width: int, height: int) -> TokenLayout:
        return TokenLayout(
            visual_tokens=self.tokens_per_image,
            parts={"resized": [self.image_size, self.image_size], "tiles": 1, "fit": self.fit},
            special_tokens=int(bool(self.before)) + int(bool(self.after)),
        )

    def segments(self, layout: TokenLayout):
        return tuple(s for s in (Text(self.before), Slots(layout.slots), Text(self.after)) if not isinstance(s, Text) or s.text)

    def resize(self, image: Image.Image) -> Image.Image:
        s = self.image_size
        if self.fit == "pad":
            # LLaVA-1.5 and transformers truncate: int(mean * 255).
            fill = tuple(int(m * 255) for m in self.mean)
            return expand_to_square(image, fill).resize((s, s), self.resample)
        if self.fit == "squash":
            return image.resize((s, s), self.resample)
        w, h = image.size
        scale = s / min(w, h)
        rw, rh = max(s, round(w * scale)), max(s, round(h * scale))
        image = image.resize((rw, rh), self.resample)
        left, top = (rw - s) // 2, (rh - s) // 2
        return image.crop((left, top, left + s, top + s))

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        pixels = normalize(self.resize(image), self.mean, self.std).unsqueeze(0)
        return ProcessedImage(pixel_values=pixels, layout=self.layout(*image.size), views=image_views(pixels, ["image"]),
                              image_size=(image.size[1], image.size[0]))


@IMAGE_PROCESSORS.register("fixed")
def build_fixed(config, tokens_per_image: int) -> FixedResizeProcessor:
    return FixedResizeProcessor(
        image_size=config.image_size,
        tokens_per_image=tokens_per_image,
        mean=config.mean,
        std=config.std,
        resample=config.resample,
        fit=config.options.get("fit", "pad"),
        before=config.options.get("before", ""),
        after=config.options.get("after", ""),
    )
