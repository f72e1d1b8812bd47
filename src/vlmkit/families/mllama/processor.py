"""Llama 3.2 Vision (Mllama): up to 4 tiles of 560 px on a canvas chosen from the supported
tile arrangements; the image reaches the LLM through gated cross-attention, not as sequence
tokens.

Follows transformers' `MllamaImageProcessor`:

* arrangements are every (a, b) with a*b <= max_tiles, used as (rows, cols) of the canvas;
* per canvas the scale is the smaller of the two axis scales; pick the smallest scale >= 1
  (least upscaling) if any, otherwise the largest scale < 1 (least downscaling); among canvases
  with that exact scale the smallest area wins, and on equal area the first;
* the image is resized (bilinear) to fit the canvas, each side clipped to [560, canvas side]
  first, `floor` on the derived side, zero-padded right/bottom, normalised, and cut row-major.

Token accounting: the sequence holds one `<|image|>` token per image. What the model attends to
is the vision encoder's output, 1601 states per tile (40 x 40 patches + class token), over all
`max_tiles` tile slots (unused ones are masked). `visual_tokens` counts the unmasked states,
`tiles * 1601`, which is what costs cross-attention compute; the padded count is in `parts`.
The lecture's "4 tiles x 420 + global" does not match this code: there is no global tile and
no per-tile reduction to 420.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from PIL import Image

from vlmkit.processing.base import ImageProcessor, ProcessedImage, TokenLayout, image_views
from vlmkit.processing.images import HALF_MEAN, HALF_STD, Resizer, tiles_into
from vlmkit.registry import IMAGE_PROCESSORS


@lru_cache(maxsize=16)
def supported_arrangements(max_tiles: int) -> tuple[tuple[int, int], ...]:
    return tuple((a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles)


def optimal_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(canvas_height, canvas_width)."""
    canvases = [(a * tile, b * tile) for a, b in supported_arrangements(max_tiles)]
    scales = []
    for ch, cw in canvases:
        sh, sw = ch / height, cw / width
        scales.append(sh if sw > sh else sw)
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(s for s in scales if s < 1)
    best = None
    for (ch, cw), s in zip(canvases, scales):
        if s == chosen and (best is None or ch * cw < best[0] * best[1]):
            best = (ch, cw)
    return best


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    sh, sw = target_h / height, target_w / width
    if sw < sh:
        return min(int(height * sw // 1) or 1, target_h), target_w
    return target_h, min(int(width * sh // 1) or 1, target_w)


class MllamaProcessor(ImageProcessor):
    def __init__(
        self,
        tile_size: int = 560,
        max_tiles: int = 4,
        patch_size: int = 14,
        mean=HALF_MEAN,
        std=HALF_STD,
        resample: str = "bilinear",
        backend: str = "torch",
        pad_tiles: bool = False,
    ):
        self.tile_size, self.max_tiles, self.patch_size = tile_size, max_tiles, patch_size
        # Also hand the empty tile slots to the model (as tile views past `num_tiles`, which its
        # cross-attention never reads): Llama 3.2 Vision's own encoder (`mllama-vit`) reads all
        # `max_tiles` slots of an image together.
        self.pad_tiles = pad_tiles
        self.states_per_tile = (tile_size // patch_size) ** 2 + 1
        self.mean, self.std = tuple(mean), tuple(std)
        self.resample, self.backend = resample, backend

    def plan(self, width: int, height: int):
        if width <= 0 or height <= 0:
            raise ValueError(f"image has zero size ({width}x{height})")
        ch, cw = optimal_canvas(height, width, self.max_tiles, self.tile_size)
        rh, rw = fit_to_canvas(height, width, ch, cw, self.tile_size)
        return ch // self.tile_size, cw // self.tile_size, rh, rw

    def aspect_ratio_id(self, rows: int, cols: int) -> int:
        return supported_arrangements(self.max_tiles).index((rows, cols)) + 1

    def layout(self, width: int, height: int) -> TokenLayout:
        rows, cols, rh, rw = self.plan(width, height)
        tiles = rows * cols
        return TokenLayout(
            visual_tokens=tiles * self.states_per_tile,
            parts={
                "grid": [rows, cols],
                "tiles": tiles,
                "resized": [rw, rh],
                "canvas": [cols * self.tile_size, rows * self.tile_size],
                "states_per_tile": self.states_per_tile,
                "cross_attention_states_padded": self.max_tiles * self.states_per_tile,
                "sequence_tokens": 1,
                "aspect_ratio_id": self.aspect_ratio_id(rows, cols),
            },
            sequence_slots=1,
        )

    def pixels(self, image: Image.Image) -> tuple[torch.Tensor, int, int]:
        """(max_tiles, 3, T, T) float32; tile slots past rows*cols are zeros, as in transformers."""
        rows, cols, rh, rw = self.plan(*image.size)
        t = self.tile_size
        out = torch.empty((self.max_tiles, 3, t, t), dtype=torch.float32)
        out[rows * cols :].zero_()
        # The resized image sits top-left on a zero canvas of whole tiles.
        resized = Resizer(image, self.resample, self.backend).resize(rh, rw)
        tiles_into(resized, out[: rows * cols], rows, cols, self.mean, self.std, exact=self.backend == "pil")
        return out, rows, cols

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        pixels, rows, cols = self.pixels(image)
        mask = torch.zeros(self.max_tiles, dtype=torch.long)
        mask[: rows * cols] = 1
        return ProcessedImage(
            pixel_values=pixels,
            layout=self.layout(*image.size),
            extra={"aspect_ratio_id": self.aspect_ratio_id(rows, cols), "aspect_ratio_mask": mask,
                   "num_tiles": rows * cols},
            # Only the real tiles are encoded (unless pad_tiles); the zero slots exist for the reference layout.
            views=image_views(pixels, ["tile"] * (self.max_tiles if self.pad_tiles else rows * cols)),
            image_size=(image.size[1], image.size[0]),
        )

    def placeholder_text(self, layout: TokenLayout, image_token: str = "<|image|>") -> str:
        # Cross-attention fusion: the image occupies one sequence position (`layout.slots` is 1).
        return super().placeholder_text(layout, image_token)


@IMAGE_PROCESSORS.register("mllama")
def build_mllama(config, tokens_per_image: int | None = None) -> MllamaProcessor:
    """`tokens_per_image` is ignored: the count follows from the tile canvas."""
    o = dict(config.options)
    return MllamaProcessor(
        tile_size=config.image_size,
        max_tiles=o.get("max_tiles", 4),
        patch_size=o.get("patch_size", 14),
        mean=config.mean,
        std=config.std,
        resample=config.resample,
        backend=o.get("backend", "torch"),
        pad_tiles=bool(o.get("pad_tiles", False)),
    )
