"""Safe image loading: every image the rest of vlmkit sees is an RGB PIL image of sane size.

Handles EXIF orientation, every PIL mode (16-bit, CMYK, palette with transparency, RGBA,
LA, 1-bit), truncated or corrupt files, zero-size images, extreme aspect ratios and
decompression bombs, each with an error that names the file.
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmkit.core.image_formats import DEFAULT_IMAGE_FORMATS, EXTERNAL_DECODER_FORMATS, image_formats  # noqa: F401  (re-exported)

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


# `Image.MAX_IMAGE_PIXELS` is a process-wide setting and `warnings.catch_warnings` a
# process-wide filter; opening (header parsing) is serialised so concurrent loads with
# different limits cannot leave either in the wrong state. Pixel decoding is not serialised.
_OPEN_LOCK = threading.Lock()
# A repr such as "<_io.BytesIO object at 0x7f...>" in Pillow's messages tells a user nothing.
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _open_checked(data, name: str, formats: tuple[str, ...], max_pixels: int) -> Image.Image:
    """`Image.open` limited to `formats`, with Pillow's own bomb check set to our limit: some
    plugins decode inside `open` (an ICO's embedded PNG) and check only through that setting."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        prev = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            return Image.open(data, formats=list(formats))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            found = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{int(found.group(1)):,} pixels, " if found else ""
            raise ImageLoadError(f"{name}: image is {size}above the limit of {max_pixels:,} "
                                 "(raise max_image_pixels if this is intended)") from None
        except UnidentifiedImageError:
            raise ImageLoadError(f"{name}: cannot decode image: not an image in an allowed format ({', '.join(formats)})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = prev


def load_image(
    source: str | os.PathLike | bytes | BinaryIO | Image.Image,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    formats=None,
) -> Image.Image:
    """Open, validate and normalise one image to RGB with EXIF orientation applied.

    Only `formats` (default `DEFAULT_IMAGE_FORMATS`) are decoded, and the pixel and aspect-ratio
    limits are checked from the header, before any pixel is decoded.
    """
    if isinstance(source, Image.Image):
        name = "<PIL image>"
        img = source
    else:
        allowed = image_formats(formats)
        name = str(source) if isinstance(source, (str, os.PathLike)) else "<image bytes>"
        data = io.BytesIO(source) if isinstance(source, bytes) else source
        if isinstance(data, (str, os.PathLike)) and not Path(data).is_file():
            raise ImageLoadError(f"{name}: image file not found")
        try:
            img = _open_checked(data, name, allowed, max_pixels)
            check_size(img.width, img.height, name, max_pixels, max_aspect_ratio)
            img.load()
        except ImageLoadError:
            raise
        except MemoryError:
            raise ImageLoadError(f"{name}: not enough memory to decode this image") from None
        except Exception as e:  # noqa: BLE001 - a corrupt file can fail anywhere in a plugin
            detail = _OBJECT_REPR.sub("the image", str(e))
            raise ImageLoadError(f"{name}: cannot decode image ({type(e).__name__}: {detail})") from None
    check_size(img.width, img.height, name, max_pixels, max_aspect_ratio)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not cost the image
        pass
    try:
        return _to_rgb(img)
    except Exception as e:  # noqa: BLE001 - an odd mode from a corrupt file
        raise ImageLoadError(f"{name}: cannot convert image of mode {img.mode!r} to RGB ({type(e).__name__})") from None


# --------------------------------------------------------------------------------------------
# Pixel helpers shared by the preprocessing families.
#
# The Hugging Face PIL processors resize with PIL and then rescale/normalise in float32 numpy,
# one tile at a time. Two things make them slow: PIL's resampler is single-threaded scalar C,
# and every tile is a separate round trip through numpy. Here an image is converted once, each
# distinct resize happens once (torch's uint8 antialiased kernel, which implements PIL's filters
# with SIMD) straight into RGBX memory, and each output tile is written once, converted and
# normalised in the same pass (a small C extension, `_pixels.c`, with a torch fallback).
# --------------------------------------------------------------------------------------------

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# torch's antialiased kernels use PIL's filter definitions (bicubic a = -0.5, triangle for
# bilinear); they differ from PIL only in fixed-point rounding (at most 2 of 255 levels).
TORCH_RESAMPLE = {"bilinear": "bilinear", "bicubic": "bicubic"}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


class Resizer:
    """One source image, resized to as many target sizes as a family needs.

    `backend="torch"` (default) is the fast path; `backend="pil"` calls PIL's own resize and is
    bit-exact with the Hugging Face PIL processors. Filters torch lacks (lanczos, nearest)
    always use PIL.
    """

    def __init__(self, image: Image.Image, resample: str = "bicubic", backend: str = "torch"):
        if image.mode != "RGB":
            image = _to_rgb(image)
        if resample not in PIL_RESAMPLE:
            raise ValueError(f"unknown resample {resample!r}; known: {sorted(PIL_RESAMPLE)}")
        if backend not in ("torch", "pil"):
            raise ValueError(f"unknown resize backend {backend!r}; use 'torch' or 'pil'")
        self.image = image
        self.resample = resample
        self.use_torch = backend == "torch" and resample in TORCH_RESAMPLE
        self._nchw: torch.Tensor | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def _source(self) -> torch.Tensor:
        """(1, C, H, W) uint8 in channels-last memory, C = 3 or 4 (RGB + PIL's padding byte)."""
        if self._nchw is None:
            hwc = _zero_copy_rgbx(self.image)
            if hwc is None:
                with warnings.catch_warnings():
                    # The array is only read; torch warns because PIL's buffer is read-only.
                    warnings.simplefilter("ignore", UserWarning)
                    hwc = torch.from_numpy(np.asarray(self.image))
            # HWC memory viewed as NCHW is channels-last, the layout torch's uint8 kernel wants.
            self._nchw = hwc.permute(2, 0, 1).unsqueeze(0)
        return self._nchw

    def resize(self, height: int, width: int) -> torch.Tensor:
        """uint8 (3, height, width); with the torch backend, a view of RGBX memory (strides 1, 4w, 4)."""
        if height <= 0 or width <= 0:
            raise ValueError(f"cannot resize to {width}x{height}")
        if (width, height) == self.image.size:
            return self._source()[0, :3]
        if self.use_torch:
            return _resize_channels_last(self._source(), height, width, self.resample)[0, :3]
        resized = self.image.resize((width, height), PIL_RESAMPLE[self.resample])
        return torch.from_numpy(np.array(resized)).permute(2, 0, 1)


def _resize_channels_last(src: torch.Tensor, height: int, width: int, resample: str) -> torch.Tensor:
    """Antialiased resize of a channels-last uint8 (1, C, H, W) into channels-last output.

    `F.interpolate` returns contiguous NCHW, so torch's kernel, which works channels-last,
    finishes with a layout-conversion copy: a third of the resize's time at 1024 px. Writing
    into a channels-last `out` skips it; the planar view the callers want is free.
    """
    out = torch.empty((1, height, width, src.shape[1]), dtype=torch.uint8).permute(0, 3, 1, 2)
    op = _AA_OUT_OPS.get(resample)
    if op is not None:
        try:
            return op(src, [height, width], False, None, None, out=out)
        except (RuntimeError, TypeError):  # a torch without the private out= overload
            pass
    return F.interpolate(src, size=(height, width), mode=TORCH_RESAMPLE[resample], antialias=True,
                         align_corners=False)


_AA_OUT_OPS = {
    name: getattr(getattr(torch.ops.aten, op, None), "out", None)
    for name, op in (("bicubic", "_upsample_bicubic2d_aa"), ("bilinear", "_upsample_bilinear2d_aa"))
}


def _constants(mean, std, exact: bool, shape: tuple[int, ...]):
    m = torch.tensor(mean, dtype=torch.float64).view(shape)
    s = torch.tensor(std, dtype=torch.float64).view(shape)
    if exact:
        return m.float(), s.float()
    return (1.0 / (255.0 * s)).float(), (m / s).float()


def _normalize_with(pixels: torch.Tensor, constants, exact: bool) -> torch.Tensor:
    a, b = constants
    if exact:
        return pixels.div_(255.0).sub_(a).div_(b)
    return pixels.mul_(a).sub_(b)


def normalize_(pixels: torch.Tensor, mean, std, exact: bool = False) -> torch.Tensor:
    """In place on float32 (..., 3, H, W) holding 0..255: (x / 255 - mean) / std.

    `exact=True` keeps the Hugging Face numpy operation order (rescale, subtract, divide, all
    float32), which reproduces its values bit for bit; the default folds the three steps into
    one multiply and one subtract (two passes instead of three, error below 1e-6).
    """
    return _normalize_with(pixels, _constants(mean, std, exact, (3, 1, 1)), exact)


try:
    from vlmkit.processing import _pixels as _native
except ImportError:  # built without a C compiler: the torch fallback gives the same bits
    _native = None


def native_pixels() -> bool:
    """Whether the C conversion kernel is in use (`VLMKIT_NATIVE_PIXELS=0` turns it off)."""
    return _native is not None and os.environ.get("VLMKIT_NATIVE_PIXELS", "1") != "0"


_native_constants_cache: dict = {}


def _native_constants(mean, std, exact: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    key = (tuple(mean), tuple(std), exact)
    if key not in _native_constants_cache:
        a, b = _constants(mean, std, exact, (3,))
        _native_constants_cache[key] = (tuple(a.tolist()), tuple(b.tolist()))
    return _native_constants_cache[key]


# The C kernel takes up to this many leading (batch) dimensions before (3, h, w).
_NATIVE_BATCH_DIMS = 4

# Floats per block of the torch fallback of `normalize_into` (4 MB): small enough that a block
# stays cache-resident between the conversion and the normalising passes, large enough that the
# per-block dispatch cost (three small ops) stays negligible.
_BLOCK_FLOATS = 1 << 20


def normalize_into(src: torch.Tensor, dst: torch.Tensor, mean, std, exact: bool = False) -> torch.Tensor:
    """dst = normalised src, for a uint8 (..., 3, h, w) view with any strides (a tile of an RGBX
    resize, Qwen2-VL's patch order) and a float32 view of the same shape. One read of the bytes,
    one write of the floats, no intermediate copy; returns dst."""
    if src.dtype != torch.uint8 or dst.dtype != torch.float32:
        raise TypeError(f"normalize_into needs uint8 -> float32, got {src.dtype} -> {dst.dtype}")
    if src.shape != dst.shape or src.dim() < 3 or src.shape[-3] != 3:
        raise ValueError(f"need matching (..., 3, h, w) shapes, got {tuple(src.shape)} and {tuple(dst.shape)}")
    if src.device.type != "cpu" or dst.device.type != "cpu":
        raise ValueError("normalize_into runs on CPU tensors")
    if any(st == 0 and n > 1 for st, n in zip(dst.stride(), dst.shape)):
        raise ValueError("dst is an expanded view: several outputs would share one memory location")
    if src.numel() == 0:
        return dst
    if native_pixels() and src.dim() <= 3 + _NATIVE_BATCH_DIMS:
        pad = 3 + _NATIVE_BATCH_DIMS - src.dim()
        p0, p1 = _native_constants(mean, std, exact)
        _native.normalize(src.data_ptr(), (0,) * pad + src.stride(), dst.data_ptr(), (0,) * pad + dst.stride(),
                          (1,) * pad + tuple(src.shape), p0, p1, exact)
        return dst
    # Torch fallback, a band of rows at a time: in whole-tensor passes a 12-tile InternVL stack
    # (31 MB, larger than the cache) would move through memory three times; a band stays in
    # cache from the conversion to the last normalising pass.
    constants = _constants(mean, std, exact, (3, 1, 1))
    height = src.shape[-2]
    band = max(1, _BLOCK_FLOATS * height // src.numel())
    for y in range(0, height, band):
        block = dst[..., y : y + band, :]
        block.copy_(src[..., y : y + band, :])
        _normalize_with(block, constants, exact)
    return dst


_NATIVE_COPY_DIMS = 8


def copy_into(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src) for float32 CPU views whose last dimension is contiguous on both sides.

    Patch layouts (Qwen2-VL's 14-float runs, written to every temporal slot) are many short
    runs, where torch's generic strided copy is slow; the C kernel moves each run as vectors.
    Anything else goes to `copy_`."""
    if (native_pixels() and src.dtype == torch.float32 and dst.dtype == torch.float32 and src.shape == dst.shape
            and 1 <= src.dim() <= _NATIVE_COPY_DIMS and src.device.type == "cpu" and dst.device.type == "cpu"
            and src.stride(-1) == 1 and dst.stride(-1) == 1
            and all(st != 0 or n == 1 for st, n in zip(dst.stride(), dst.shape))):
        pad = _NATIVE_COPY_DIMS - src.dim()
        _native.copy(src.data_ptr(), (0,) * pad + src.stride(), dst.data_ptr(), (0,) * pad + dst.stride(),
                     (1,) * pad + tuple(src.shape))
        return dst
    return dst.copy_(src)


def pad_value(mean, std, exact: bool = False, level: int = 0) -> torch.Tensor:
    """(3, 1, 1) float32: what a padding pixel of `level` (0..255) becomes, computed by the same
    path as every other pixel so padded regions match a normalised zero canvas bit for bit."""
    out = torch.empty((3, 1, 1), dtype=torch.float32)
    return normalize_into(torch.full((3, 1, 1), level, dtype=torch.uint8), out, mean, std, exact)


def tiles_into(image: torch.Tensor, out: torch.Tensor, rows: int, cols: int, mean, std, exact: bool = False,
               top: int = 0, left: int = 0) -> torch.Tensor:
    """Cut a (rows*t, cols*t) canvas into `out` (rows*cols, 3, t, t), row-major, normalised.

    The canvas holds the uint8 (3, H, W) `image` at (top, left) and zeros elsewhere (the
    padding of LLaVA-NeXT, Llama 3.2 Vision); parts of the image outside the canvas are dropped
    (Idefics3's crops). No canvas is materialised: each tile's share of the image is normalised
    straight into place and only its padding bands are filled.
    """
    t = out.shape[-1]
    if out.shape[0] != rows * cols or tuple(out.shape[1:]) != (3, t, t):
        raise ValueError(f"out must be ({rows * cols}, 3, t, t), got {tuple(out.shape)}")
    _, h, w = image.shape
    grid = out.view(rows, cols, 3, t, t)
    fill = None
    for r in range(rows):
        # The image's rows inside this tile row, in tile coordinates.
        y0, y1 = min(max(top - r * t, 0), t), min(max(top + h - r * t, 0), t)
        band = image[:, r * t + y0 - top : r * t + y1 - top]
        if y1 > y0 and left <= 0 and left + w >= cols * t:
            # The image spans the whole tile row: one call, which reads it in memory order.
            window = band[:, :, -left : cols * t - left].reshape(3, y1 - y0, cols, t).permute(2, 0, 1, 3)
            normalize_into(window, grid[r, :, :, y0:y1], mean, std, exact)
            x_spans = [(0, t)] * cols
        else:
            x_spans = []
            for c in range(cols):
                x0, x1 = min(max(left - c * t, 0), t), min(max(left + w - c * t, 0), t)
                if y1 > y0 and x1 > x0:
                    window = band[:, :, c * t + x0 - left : c * t + x1 - left]
                    normalize_into(window, grid[r, c, :, y0:y1, x0:x1], mean, std, exact)
                x_spans.append((x0, x1) if y1 > y0 and x1 > x0 else (0, 0))
        for c, (x0, x1) in enumerate(x_spans):
            ya, yb = (y0, y1) if x1 > x0 else (0, 0)
            if (ya, yb, x0, x1) == (0, t, 0, t):
                continue
            fill = pad_value(mean, std, exact) if fill is None else fill
            tile = grid[r, c]
            for pad in (tile[:, :ya], tile[:, yb:], tile[:, ya:yb, :x0], tile[:, ya:yb, x1:]):
                if pad.numel():
                    pad.copy_(fill.expand_as(pad))
    return out


def to_normalized(u8: torch.Tensor, mean, std, exact: bool = False, channel_dim: int = -3,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 with 3 channels at `channel_dim` -> normalised float32 of the same shape (written
    into `out`, a float32 tensor of that shape whose leading, channel and trailing dimensions
    each flatten without a copy, when given)."""
    cd = channel_dim % u8.dim()
    if u8.shape[cd] != 3:
        raise ValueError(f"expected 3 channels at dim {channel_dim}, got shape {tuple(u8.shape)}")
    if out is None:
        out = torch.empty(u8.shape, dtype=torch.float32)
    elif out.shape != u8.shape or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 of shape {tuple(u8.shape)}, got {out.dtype} {tuple(out.shape)}")
    try:
        out.view(math.prod(u8.shape[:cd]), 3, math.prod(u8.shape[cd + 1:]))
    except RuntimeError:
        raise ValueError(f"out must be float32 of shape {tuple(u8.shape)} with flattenable strides") from None
    # Channels to dim -3 as views (trailing unit dims for 1-d and 2-d input): normalize_into
    # takes any strides, so nothing is copied.
    src, dst = u8, out
    while src.dim() < 3:
        src, dst = src[..., None], dst[..., None]
    normalize_into(src.movedim(cd, -3), dst.movedim(cd, -3), mean, std, exact)
    return out


def _zero_copy_rgbx(image: Image.Image) -> torch.Tensor | None:
    """(H, W, 4) view of an RGB image's own memory, or None where that is not possible.

    `np.asarray(pil_image)` repacks PIL's 4-bytes-per-pixel storage into a new buffer, which
    costs as much as a resize for a 1024 px image; the Arrow export shares the buffer instead.
    It needs pyarrow and a single-block image, so everything else falls back to the copy.
    """
    if image.mode != "RGB" or not hasattr(image, "__arrow_c_array__"):
        return None
    try:
        import pyarrow as pa

        arr = pa.array(image)
        w, h = image.size
        flat = np.frombuffer(arr.buffers()[-1], dtype=np.uint8)
        if flat.size < h * w * 4:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(flat[: h * w * 4].reshape(h, w, 4))
    except Exception:  # no pyarrow, multi-block image, or an older Pillow export format
        return None
