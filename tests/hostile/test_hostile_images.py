"""Hostile and careless images: each kind is a defined RGB image or an ImageLoadError that names
the source, decoded only from the allow-listed formats and only after the pixel check."""

from __future__ import annotations

import io
import struct
import subprocess
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, PngImagePlugin

from vlmkit.processing.images import DEFAULT_IMAGE_FORMATS, ImageLoadError, image_formats, load_image


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (CRC fixed up, so only the size lies)."""
    data = bytearray(encode(Image.new("RGB", (1, 1))))
    ihdr = data[12:29]  # "IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def ico_wrapping(png: bytes, claimed: int = 16) -> bytes:
    """An ICO whose directory claims claimed x claimed, holding `png` as its only entry."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", claimed, claimed, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"


@pytest.fixture
def no_external_programs(monkeypatch):
    """Any attempt to start a program (Ghostscript for EPS) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"an external program was started: {args[:1]}")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


# ---- refused kinds: (bytes, pattern the ImageLoadError must match) ------------------------------

def _refused_cases():
    big_png = encode(Image.new("RGB", (3000, 3000)))
    return {
        "empty bytes": (b"", "not an image in an allowed format"),
        "text": (b"hello, I am not an image\n" * 10, "not an image in an allowed format"),
        "html": (b"<html><body><img src=x onerror=alert(1)></body></html>", "not an image in an allowed format"),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "not an image in an allowed format"),
        "eps named png": (EPS, "not an image in an allowed format"),
        "ico": (encode(Image.new("RGB", (16, 16)), "ICO"), "not an image in an allowed format"),
        "ico wrapping a 3000x3000 png": (ico_wrapping(big_png), "not an image in an allowed format"),
        "pdf": (encode(Image.new("RGB", (16, 16)), "PDF"), "not an image in an allowed format"),
        "ppm": (encode(Image.new("RGB", (16, 16)), "PPM"), "not an image in an allowed format"),
        "tga": (encode(Image.new("RGB", (16, 16)), "TGA"), "not an image in an allowed format"),
        "pcx": (encode(Image.new("RGB", (16, 16)), "PCX"), "not an image in an allowed format"),
        "png header only": (encode(Image.new("RGB", (8, 8)))[:33], "cannot decode"),
        "truncated png": (encode(Image.new("RGB", (64, 64), (1, 2, 3)))[:80], "cannot decode"),
        "truncated jpeg": (encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")[:120], "cannot decode"),
        "png claiming 100000x100000": (png_claiming(100_000, 100_000), "above the limit of 1,000,000"),
        "png claiming 65535x65535": (png_claiming(65535, 65535), "above the limit of 1,000,000"),
        "png claiming 0x5": (png_claiming(0, 5), "not an image in an allowed format"),
        "png 3000x3000": (big_png, "above the limit of 1,000,000"),
        "gif 1x5000": (encode(Image.new("P", (1, 5000)), "GIF"), "aspect ratio 5000:1"),
        "tiff claiming too many pixels": (encode(Image.new("L", (2000, 1000)), "TIFF"), "above the limit of 1,000,000"),
        "bmp corrupt after header": (encode(Image.new("RGB", (32, 32)), "BMP")[:60], "cannot decode"),
        "random bytes with a png signature": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "cannot decode"),
    }


REFUSED = _refused_cases()


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_refused_image_kinds(kind, no_external_programs):
    data, pattern = REFUSED[kind]
    with pytest.raises(ImageLoadError, match=pattern) as info:
        load_image(data, max_pixels=1_000_000)
    message = str(info.value)
    assert message.startswith("<image bytes>: ")
    assert " object at 0x" not in message
    # The process is still usable: a good image loads right after.
    assert load_image(encode(Image.new("RGB", (4, 4)))).size == (4, 4)


# ---- accepted kinds: each gives an RGB image of the right size -----------------------------------

def _animated_gif() -> bytes:
    frames = [Image.new("P", (20, 10), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


ACCEPTED = {
    "png rgb": (encode(Image.new("RGB", (20, 10), (1, 2, 3))), (20, 10)),
    "png rgba": (encode(Image.new("RGBA", (20, 10), (1, 2, 3, 0))), (20, 10)),
    "png 1-bit": (encode(Image.new("1", (20, 10), 1)), (20, 10)),
    "png LA": (encode(Image.new("LA", (20, 10))), (20, 10)),
    "png 16-bit": (encode(Image.fromarray(np.full((10, 20), 40000, dtype=np.uint16))), (20, 10)),
    "jpeg": (encode(Image.new("RGB", (20, 10)), "JPEG"), (20, 10)),
    "jpeg cmyk": (encode(Image.new("CMYK", (20, 10)), "JPEG"), (20, 10)),
    "webp": (encode(Image.new("RGB", (20, 10)), "WEBP"), (20, 10)),
    "gif animated": (_animated_gif(), (20, 10)),
    "bmp": (encode(Image.new("RGB", (20, 10)), "BMP"), (20, 10)),
    "tiff": (encode(Image.new("RGB", (20, 10)), "TIFF"), (20, 10)),
    "tiff float": (encode(Image.new("F", (20, 10), 3.5), "TIFF"), (20, 10)),
}


@pytest.mark.parametrize("kind", sorted(ACCEPTED))
def test_accepted_image_kinds(kind, no_external_programs):
    data, size = ACCEPTED[kind]
    img = load_image(data, max_pixels=1_000_000)
    assert img.mode == "RGB" and img.size == size


def test_default_allow_list_is_the_documented_one():
    assert DEFAULT_IMAGE_FORMATS == ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


# ---- the failures the issue reported -------------------------------------------------------------

def test_ico_wrapping_a_large_png_is_not_decoded_even_when_ico_is_allowed(monkeypatch):
    """The ICO plugin decodes its embedded PNG inside Image.open; the pixel limit must stop it first."""
    data = ico_wrapping(encode(Image.new("RGB", (3000, 3000))))

    def decoded(self, *a, **k):
        raise AssertionError("the embedded PNG was decoded before the pixel check")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", decoded)
    with pytest.raises(ImageLoadError, match=r"9,000,000 pixels, above the limit of 1,000,000"):
        load_image(data, max_pixels=1_000_000, formats=["ICO", "PNG"])


def test_allowed_formats_are_checked_before_any_pixel_is_decoded(monkeypatch):
    data = encode(Image.new("RGB", (3000, 3000)), "TIFF")

    def decoded(self, *a, **k):
        raise AssertionError("decoded before the pixel check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)
    with pytest.raises(ImageLoadError, match="above the limit of 1,000,000"):
        load_image(data, max_pixels=1_000_000)


def test_eps_never_reaches_ghostscript(no_external_programs, tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(EPS)
    with pytest.raises(ImageLoadError, match=r"photo\.png: cannot decode image: not an image in an allowed format"):
        load_image(path)
    # Not even on request: Pillow hands EPS to an external program.
    with pytest.raises(ValueError, match="external program"):
        load_image(path, formats=["EPS", "PNG"])


def test_allow_list_can_be_widened_and_is_validated():
    ppm = encode(Image.new("RGB", (6, 4)), "PPM")
    with pytest.raises(ImageLoadError, match="allowed format"):
        load_image(ppm)
    assert load_image(ppm, formats=["PPM"]).size == (6, 4)
    assert image_formats(["png", "jpg"]) == ("PNG", "JPEG")
    with pytest.raises(ValueError, match="unknown image format 'XYZ'"):
        image_formats(["XYZ"])
    with pytest.raises(ValueError, match="empty"):
        image_formats([])


def test_errors_never_show_object_reprs():
    for data in (b"nope", io.BytesIO(b"nope"), io.BytesIO(encode(Image.new("RGB", (8, 8)))[:40])):
        with pytest.raises(ImageLoadError) as info:
            load_image(data)
        assert " object at 0x" not in str(info.value)


def test_directory_and_missing_file_name_the_path(tmp_path):
    with pytest.raises(ImageLoadError, match="image file not found"):
        load_image(tmp_path)
    with pytest.raises(ImageLoadError, match=r"nope\.jpg: image file not found"):
        load_image(tmp_path / "nope.jpg")


def test_processor_config_carries_the_allow_list():
    from vlmkit.config import ConfigError, load_config

    cfg = load_config({"model": {"processor": {"image_formats": ["png", "ppm"]}}})
    assert cfg.model.processor.image_formats == ["PNG", "PPM"]
    with pytest.raises(ConfigError, match="external program"):
        load_config({"model": {"processor": {"image_formats": ["EPS"]}}})


def test_concurrent_loads_leave_pillows_global_limit_alone():
    from concurrent.futures import ThreadPoolExecutor

    before = Image.MAX_IMAGE_PIXELS
    data = [encode(Image.new("RGB", (50 + i, 40))) for i in range(16)]
    with ThreadPoolExecutor(4) as pool:
        sizes = list(pool.map(lambda d: load_image(d, max_pixels=10_000 + len(d)).size, data))
    assert sizes == [(50 + i, 40) for i in range(16)]
    assert Image.MAX_IMAGE_PIXELS == before
