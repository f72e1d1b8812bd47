"""Which image formats vlmkit decodes: the default allow-list and the names a user may add."""

from __future__ import annotations

from PIL import Image

# Formats decoded by default: the common photo and screenshot formats, each with a header that
# states the size before any pixel is decoded. Pillow knows many more; some run external
# programs (EPS goes to Ghostscript) or decode inside `Image.open` (ICO, ICNS), so they are
# opt-in (`image_formats` in the processor config, `--image-format` for `vlmkit serve`).
DEFAULT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# Never decoded, even when asked for: Pillow hands these to external programs.
EXTERNAL_DECODER_FORMATS = frozenset({"EPS"})


def image_formats(formats) -> tuple[str, ...]:
    """Validated, upper-case Pillow format names; the default allow-list when `formats` is None."""
    if formats is None:
        return DEFAULT_IMAGE_FORMATS
    Image.init()
    out = []
    for f in formats:
        name = str(f).upper()
        if name == "JPG":
            name = "JPEG"
        if name in EXTERNAL_DECODER_FORMATS:
            raise ValueError(f"image format {name!r} is decoded by an external program and is never allowed")
        if name not in Image.OPEN:
            raise ValueError(f"unknown image format {f!r}; Pillow can open: {', '.join(sorted(Image.OPEN))}")
        out.append(name)
    if not out:
        raise ValueError("the list of allowed image formats is empty")
    return tuple(dict.fromkeys(out))
