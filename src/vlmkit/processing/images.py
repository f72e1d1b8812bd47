"""Safe image loading: every image the rest of vlmkit sees is an RGB PIL image of sane size.

Handles EXIF orientation, every PIL mode (16-bit, CMYK, palette with transparency, RGBA,
LA, 1-bit), truncated or corrupt files, zero-size images, extreme aspect ratios and
decompression bombs, each with an error that names the file.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_ASPECT_RATIO = 200.0


class ImageLoadError(ValueError):
    """An image that cannot be used; the message names the source."""


def _to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, compositing transparency onto `background`."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit greyscale: scale the true range to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 65535.0 * 255.0
        elif img.mode == "I":
            hi = 65535.0 if arr.max(initial=0) > 255 else 255.0
            arr = arr / hi * 255.0
        else:
            lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if img.mode == "CMYK":
        return img.convert("RGB")
    return img.convert("RGB")


def check_size(width: int, height: int, source: str, max_pixels: int, max_aspect_ratio: float) -> None:
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{source}: image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{source}: image is {width}x{height} = {width * height:,} pixels, above the limit of "
            f"{max_pixels:,} (raise max_image_pixels if this is intended)"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        raise ImageLoadError(
            f"{source}: aspect ratio {ratio:.0f}:1 ({width}x{height}) is above the limit of {max_aspect_ratio:g}"
        )


def load_image(
    source: str | os.PathLike | bytes | BinaryIO | Image.Image,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> Image.Image:
    """Open, validate and normalise one image to RGB with EXIF orientation applied."""
    if isinstance(source, Image.Image):
        name = "<PIL image>"
        img = source
    else:
        name = str(source) if isinstance(source, (str, os.PathLike)) else "<image bytes>"
        data = io.BytesIO(source) if isinstance(source, bytes) else source
        if isinstance(data, (str, os.PathLike)) and not Path(data).is_file():
            raise ImageLoadError(f"{name}: image file not found")
        try:
            # PIL's own bomb check runs in open(); route it through our limit instead.
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                prev = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
                try:
                    img = Image.open(data)
                finally:
                    Image.MAX_IMAGE_PIXELS = prev
            check_size(img.width, img.height, name, max_pixels, max_aspect_ratio)
            img.load()
        except ImageLoadError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageLoadError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
    check_size(img.width, img.height, name, max_pixels, max_aspect_ratio)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not cost the image
        pass
    return _to_rgb(img)
