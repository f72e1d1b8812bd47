"""Idefics3 / SmolVLM: resize the longest edge to a fixed size, split into encoder-size crops
plus a global view, and pixel-shuffle each crop's patches down to `image_seq_len` tokens.

Follows transformers' `Idefics3ImageProcessor` (SmolVLM's is the same code) step for step,
because every step rounds:

1. longest edge to `longest_edge` (up or down), the other side `int()` of the scaled value and
   bumped to even, then capped at 4096;
2. both sides rounded up to multiples of `crop` (the long side first; the short side is derived
   from the *new* long side with `int()`, then rounded up) - a second resize;
3. if larger than one crop: row-major crops plus the whole image resized to `crop` x `crop`
   last; otherwise just the image.

Token count per crop: `((crop / patch) ** 2) / scale_factor ** 2` (169 for Idefics3-8B, 81 for
SmolVLM-Instruct, 64 for SmolVLM-256M/500M).

transformers' `get_number_of_image_patches` (used by vLLM and the processor's token accounting)
derives the short side from the *old* long side while the pixel path uses the new one; the
ceilings make both agree on every size we swept (tests/processing/test_processing_parity.py), and vlmkit
counts what the pixel path produces.

Resampling is Lanczos, which torch has no kernel for, so this family always resizes with PIL.
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from vlmkit.processing.base import ImageProcessor, ProcessedImage, Segment, Slots, Text, TokenLayout, image_views
from vlmkit.processing.images import HALF_MEAN, HALF_STD, Resizer, normalize_into, tiles_into, to_normalized
from vlmkit.registry import IMAGE_PROCESSORS

MAX_IMAGE_SIZE = 4096


def resize_longest_edge(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    # Cap at 4096 (only reachable with a longest_edge above it).
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def resize_to_crops(height: int, width: int, crop: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height:
        width = math.ceil(width / crop) * crop
        height = math.ceil(int(width / aspect) / crop) * crop
    else:
        height = math.ceil(height / crop) * crop
        width = math.ceil(int(height * aspect) / crop) * crop
    return height, width


class Idefics3Processor(ImageProcessor):
    def __init__(
        self,
        longest_edge: int = 4 * 364,
        crop_size: int = 364,
        patch_size: int = 14,
        scale_factor: int = 2,
        do_image_splitting: bool = True,
        mean=HALF_MEAN,
        std=HALF_STD,
        resample: str = "lanczos",
        backend: str = "pil",
    ):
        self.longest_edge, self.crop_size = longest_edge, crop_size
        self.patch_size, self.scale_factor = patch_size, scale_factor
        self.image_seq_len = int((crop_size // patch_size) ** 2 / scale_factor**2)
        self.do_image_splitting = do_image_splitting
        self.mean, self.std = tuple(mean), tuple(std)
        self.resample, self.backend = resample, backend

    def plan(self, width: int, height: int):
        """(first resize (h, w), second resize (h, w) or None, rows, cols)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image has zero size ({width}x{height})")
        h1, w1 = resize_longest_edge(height, width, self.longest_edge)
        if not self.do_image_splitting:
            return (h1, w1), None, 0, 0
        h2, w2 = resize_to_crops(h1, w1, self.crop_size)
        c = self.crop_size
        if h2 > c or w2 > c:
            return (h1, w1), (h2, w2), (h2 - c) // c + 1, (w2 - c) // c + 1
        return (h1, w1), (h2, w2), 0, 0

    def layout(self, width: int, height: int) -> TokenLayout:
        first, second, rows, cols = self.plan(width, height)
        views = rows * cols + 1
        # Text around the image: per crop <fake_token_around_image><row_r_col_c>, a newline per
        # row, then "\n<fake_token_around_image><global-img>" ... "<fake_token_around_image>".
        special = 2 * rows * cols + rows + 4 if rows else 3
        return TokenLayout(
            visual_tokens=views * self.image_seq_len,
            parts={
                "grid": [rows, cols],
                "crops": rows * cols,
                "global_image": True,
                "resized": [(second or first)[1], (second or first)[0]],
                "tokens_per_crop": self.image_seq_len,
            },
            special_tokens=special,
        )

    def pixels(self, image: Image.Image) -> torch.Tensor:
        (h1, w1), second, rows, cols = self.plan(*image.size)
        c = self.crop_size
        img = Resizer(image, self.resample, self.backend).resize(h1, w1)
        exact = self.backend == "pil"
        if second is None:
            return to_normalized(_resize_u8(img, c, c, self.resample, self.backend), self.mean, self.std, exact)[None]
        img = _resize_u8(img, second[0], second[1], self.resample, self.backend)
        if not rows:
            return to_normalized(img, self.mean, self.std, exact)[None]
        out = torch.empty((rows * cols + 1, 3, c, c), dtype=torch.float32)
        # Crops cover the top-left rows*c x cols*c of the image; the global image comes last.
        tiles_into(img, out[:-1], rows, cols, self.mean, self.std, exact)
        normalize_into(_resize_u8(img, c, c, self.resample, self.backend), out[-1], self.mean, self.std, exact)
        return out

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        layout = self.layout(*image.size)
        rows, cols = layout.parts["grid"]
        pixels = self.pixels(image)
        roles = ["tile"] * (rows * cols) + ["thumbnail"] if rows else ["image"]
        return ProcessedImage(pixel_values=pixels, layout=layout, extra={"rows": rows, "cols": cols},
                              views=image_views(pixels, roles), image_size=(image.size[1], image.size[0]))

    def segments(self, layout: TokenLayout) -> tuple[Segment, ...]:
        rows, cols = layout.parts["grid"]
        body = Slots(self.image_seq_len)
        fake, glob = "<fake_token_around_image>", "<global-img>"
        if not rows:
            return Text(f"{fake}{glob}"), body, Text(fake)
        out: list[Segment] = []
        for r in range(rows):
            for c in range(cols):
                out += [Text(f"{fake}<row_{r + 1}_col_{c + 1}>"), body]
            out.append(Text("\n"))
        return (*out, Text(f"\n{fake}{glob}"), body, Text(fake))

    def placeholder_text(self, layout: TokenLayout, image_token: str = "<image>") -> str:
        return super().placeholder_text(layout, image_token)


def _resize_u8(u8: torch.Tensor, height: int, width: int, resample: str, backend: str) -> torch.Tensor:
    if tuple(u8.shape[-2:]) == (height, width):
        return u8
    img = Image.fromarray(u8.permute(1, 2, 0).contiguous().numpy(), "RGB")
    return Resizer(img, resample, backend).resize(height, width)


@IMAGE_PROCESSORS.register("idefics3")
def build_idefics3(config, tokens_per_image: int | None = None) -> Idefics3Processor:
    """`tokens_per_image` is ignored: the count follows from the crop grid."""
    o = dict(config.options)
    return Idefics3Processor(
        longest_edge=o.get("longest_edge", 4 * config.image_size),
        crop_size=config.image_size,
        patch_size=o.get("patch_size", 14),
        scale_factor=o.get("scale_factor", 2),
        do_image_splitting=o.get("do_image_splitting", True),
        mean=config.mean,
        std=config.std,
        resample=o.get("resample", "lanczos"),
        backend=o.get("backend", "pil"),
    )
