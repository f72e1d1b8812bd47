"""Idefics2: each image at (about) its own resolution, read by a Perceiver resampler into a fixed
number of tokens per view.

Follows transformers' `Idefics2ImageProcessor` / `Idefics2Processor` and the model's
`get_image_features`:

* views: the image, or with `do_image_splitting` its four quadrants (split at `w // 2`,
  `h // 2`) followed by the whole image;
* each view is resized on its own: a longest side above `longest_edge` comes down to it (the
  other side `int()` of the scaled value), then each side is raised to at least `shortest_edge`
  (without keeping the aspect ratio); nothing else is resized;
* the model reads only whole patches (`patch_attention_mask` keeps a patch when all of its
  pixels are real), so each view is cut to a multiple of the patch size at its bottom / right:
  the same features transformers computes from its padded batch, whatever the other images;
* text: `<fake_token_around_image>` + `image_seq_len` image tokens + `<fake_token_around_image>`
  per view, the boundary token shared between adjacent views and images, and a space after a
  closing boundary token that text (other than a space or a special token) follows
  (`finish_text`).
"""

from __future__ import annotations

import re

import torch
from PIL import Image

from vlmkit.processing.base import ImageProcessor, ProcessedImage, Segment, Slots, Text, TokenLayout, View
from vlmkit.processing.images import Resizer, normalize_into
from vlmkit.registry import IMAGE_PROCESSORS

IMAGENET_STANDARD = (0.5, 0.5, 0.5)
FAKE = "<fake_token_around_image>"


def idefics2_resize(height: int, width: int, shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """transformers' `get_resize_output_image_size` for Idefics2: (height, width)."""
    aspect = width / height
    if width >= height and width > longest_edge:
        width = longest_edge
        height = int(width / aspect)
    elif height > width and height > longest_edge:
        height = longest_edge
        width = int(height * aspect)
    return max(height, shortest_edge), max(width, shortest_edge)


class Idefics2Processor(ImageProcessor):
    def __init__(self, shortest_edge: int = 378, longest_edge: int = 980, patch_size: int = 14, image_seq_len: int = 64,
                 do_image_splitting: bool = False, mean=IMAGENET_STANDARD, std=IMAGENET_STANDARD, resample: str = "bilinear",
                 backend: str = "pil"):
        if shortest_edge < patch_size:
            raise ValueError(f"shortest_edge {shortest_edge} is smaller than a patch ({patch_size} px)")
        if longest_edge < shortest_edge:
            raise ValueError(f"longest_edge {longest_edge} is smaller than shortest_edge {shortest_edge}")
        self.shortest_edge, self.longest_edge, self.patch_size = shortest_edge, longest_edge, patch_size
        self.image_seq_len, self.do_image_splitting = image_seq_len, do_image_splitting
        self.mean, self.std, self.resample, self.backend = tuple(mean), tuple(std), resample, backend

    def _boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """(left, top, right, bottom) of each view in the original image."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image has zero size ({width}x{height})")
        if not self.do_image_splitting:
            return [(0, 0, width, height)]
        mw, mh = width // 2, height // 2
        if not mw or not mh:
            raise ValueError(f"a {width}x{height} image is too small to split into quadrants")
        return [(0, 0, mw, mh), (mw, 0, width, mh), (0, mh, mw, height), (mw, mh, width, height), (0, 0, width, height)]

    def view_sizes(self, width: int, height: int) -> list[tuple[int, int]]:
        """(resized (h, w), the whole-patch (h, w) the model reads) of each view."""
        p = self.patch_size
        out = []
        for left, top, right, bottom in self._boxes(width, height):
            h, w = idefics2_resize(bottom - top, right - left, self.shortest_edge, self.longest_edge)
            out.append(((h, w), (h // p * p, w // p * p)))
        return out

    def layout(self, width: int, height: int) -> TokenLayout:
        sizes = self.view_sizes(width, height)
        return TokenLayout(visual_tokens=len(sizes) * self.image_seq_len, special_tokens=len(sizes) + 1,
                           parts={"views": len(sizes), "resized": [[w, h] for (h, w), _ in sizes],
                                  "read": [[w, h] for _, (h, w) in sizes], "tokens_per_view": self.image_seq_len})

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        if image.mode != "RGB":
            image = image.convert("RGB")
        w, h = image.size
        boxes, sizes = self._boxes(w, h), self.view_sizes(w, h)
        big_h, big_w = max(s[1][0] for s in sizes), max(s[1][1] for s in sizes)
        pixels = torch.zeros((len(boxes), 3, big_h, big_w), dtype=torch.float32)
        views = []
        for i, (box, ((rh, rw), (ch, cw))) in enumerate(zip(boxes, sizes)):
            crop = image if box == (0, 0, w, h) else image.crop(box)
            u8 = Resizer(crop, self.resample, self.backend).resize(rh, rw)[:, :ch, :cw]
            normalize_into(u8, pixels[i, :, :ch, :cw], self.mean, self.std, self.backend == "pil")
            views.append(View("tile" if i < len(boxes) - 1 else "image", (ch, cw)))
        return ProcessedImage(pixel_values=pixels, layout=self.layout(w, h), views=tuple(views), image_size=(h, w))

    def segments(self, layout: TokenLayout) -> tuple[Segment, ...]:
        out: list[Segment] = [Text(FAKE)]
        for _ in range(layout.parts["views"]):
            out += [Slots(self.image_seq_len), Text(FAKE)]
        return tuple(out)

    def finish_text(self, text: str) -> str:
        # transformers' Idefics2Processor, on the prompt after expansion.
        text = text.replace(FAKE + FAKE, FAKE)
        return re.sub(rf"{re.escape(FAKE)}(?=[^\s<])", FAKE + " ", text)


@IMAGE_PROCESSORS.register("idefics2")
def build_idefics2(config, tokens_per_image: int | None = None) -> Idefics2Processor:
    """`image_size` is the shortest edge; `tokens_per_image` (the connector's latents) is each
    view's token count."""
    o = dict(config.options)
    return Idefics2Processor(shortest_edge=config.image_size, longest_edge=o.get("longest_edge", 980),
                             patch_size=o.get("patch_size", 14), image_seq_len=o.get("image_seq_len", tokens_per_image or 64),
                             do_image_splitting=o.get("do_image_splitting", False), mean=config.mean, std=config.std,
                             resample=config.resample, backend=o.get("backend", "pil"))
