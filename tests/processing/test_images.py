"""Bad input never reaches a model: each case is a clear ImageLoadError or a defined conversion."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vlmkit.processing.anyres import AnyResProcessor
from vlmkit.processing.images import ImageLoadError, Resizer, load_image


def require_native_kernel() -> None:
    """The C extension must be built wherever a C compiler exists (`make venv` builds it)."""
    import shutil

    import vlmkit.processing.images as images

    if images._native is None:
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail("the C extension vlmkit.processing._pixels is not built although a C compiler exists")
        pytest.skip("no C compiler here: the extension is not built and the torch fallback is in use")


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_truncated_file_is_a_clear_error(tmp_path):
    data = encode(Image.new("RGB", (64, 64), (1, 2, 3)))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.png: cannot decode"):
        load_image(path)


def test_corrupt_bytes_and_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="cannot decode"):
        load_image(b"definitely not an image")
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.jpg")


def test_zero_size_image():
    with pytest.raises(ImageLoadError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))


def test_one_by_ten_thousand_is_rejected_by_aspect_ratio():
    img = Image.new("RGB", (1, 10000))
    with pytest.raises(ImageLoadError, match="aspect ratio 10000:1"):
        load_image(encode(img))
    # Allowed explicitly, it loads, and a tiling family turns it into a defined tile set.
    ok = load_image(encode(img), max_aspect_ratio=20000)
    out = AnyResProcessor().preprocess(ok)
    assert out.pixel_values.shape[1:] == (3, 336, 336)
    assert out.layout.visual_tokens > 0


def test_sixteen_bit_greyscale_keeps_its_range():
    arr = np.full((8, 8), 65535, dtype=np.uint16)
    arr[:, :4] = 32768
    img = load_image(encode(Image.fromarray(arr)))
    assert img.mode == "RGB"
    px = np.asarray(img)
    assert px[0, 7].tolist() == [255, 255, 255]
    assert px[0, 0].tolist() == [128, 128, 128]  # mid-range stays mid-grey, not clipped to white


def test_cmyk_converts_to_rgb():
    img = load_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"))
    assert img.mode == "RGB"
    r, g, b = np.asarray(img)[8, 8].tolist()
    assert r > 200 and g < 60 and b < 60  # pure red ink


def test_palette_with_transparency_and_rgba_composite_on_white():
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30] * 256)
    pal.info["transparency"] = 0
    for src in (encode(pal), encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0)))):
        img = load_image(src)
        assert img.mode == "RGB"
        assert np.asarray(img)[0, 0].tolist() == [255, 255, 255]


def test_decompression_bomb_limit_is_configurable_and_checked_before_decoding():
    data = encode(Image.new("RGB", (3000, 3000)))
    with pytest.raises(ImageLoadError, match="above the limit of 1,000,000"):
        load_image(data, max_pixels=1_000_000)
    assert load_image(data, max_pixels=10_000_000).size == (3000, 3000)


def test_resizer_accepts_any_mode_and_rejects_bad_sizes():
    r = Resizer(Image.new("LA", (10, 10)), "bicubic")
    assert r.resize(5, 7).shape == (3, 5, 7)
    with pytest.raises(ValueError, match="cannot resize"):
        r.resize(0, 4)
    with pytest.raises(ValueError, match="unknown resample"):
        Resizer(Image.new("RGB", (2, 2)), "cubic")


@pytest.fixture(params=["native", "torch"])
def pixel_path(request, monkeypatch):
    """Run a test on the C kernel and on the torch fallback."""
    import vlmkit.processing.images as images

    if request.param == "native":
        require_native_kernel()
    monkeypatch.setenv("VLMKIT_NATIVE_PIXELS", "1" if request.param == "native" else "0")
    assert images.native_pixels() == (request.param == "native")
    return request.param


@pytest.mark.parametrize("shape,channel_dim", [((5, 3, 40, 36), -3), ((3, 700, 900), 0), ((50, 3, 392), 1)])
def test_blockwise_normalisation_equals_the_whole_tensor_at_once(monkeypatch, pixel_path, shape, channel_dim):
    import torch

    import vlmkit.processing.images as images

    monkeypatch.setattr(images, "_BLOCK_FLOATS", 1000)  # many blocks, including partial ones
    u8 = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    for exact in (False, True):
        got = images.to_normalized(u8, mean, std, exact=exact, channel_dim=channel_dim)
        moved = u8.movedim(channel_dim, -3).float()
        want = images.normalize_(moved.clone(), mean, std, exact=exact).movedim(-3, channel_dim)
        assert torch.equal(got, want)
        if exact:  # the exact order reproduces numpy's float32 arithmetic (the HF processors') bit for bit
            ref = ((u8.movedim(channel_dim, -1).numpy().astype(np.float32) / np.float32(255.0) - np.array(mean, np.float32))
                   / np.array(std, np.float32))
            assert np.array_equal(got.movedim(channel_dim, -1).numpy(), ref)
    with pytest.raises(ValueError, match="out must be"):
        images.to_normalized(u8, mean, std, channel_dim=channel_dim, out=torch.empty(3))


def test_normalised_output_can_be_a_strided_slot_of_a_larger_tensor(pixel_path):
    import torch

    from vlmkit.processing.images import to_normalized

    u8 = torch.randint(0, 256, (7, 3, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    big = torch.zeros(7, 3, 2, 20)
    to_normalized(u8, (0.5,) * 3, (0.25,) * 3, channel_dim=1, out=big[:, :, 0])  # Qwen2-VL's temporal slot
    assert torch.equal(big[:, :, 0], to_normalized(u8, (0.5,) * 3, (0.25,) * 3, channel_dim=1))
    assert torch.equal(big[:, :, 1], torch.zeros(7, 3, 20))
    with pytest.raises(ValueError, match="flattenable"):  # its last two axes cannot merge into one
        to_normalized(u8.view(7, 3, 4, 5), (0.5,) * 3, (0.25,) * 3, channel_dim=1, out=torch.zeros(7, 3, 5, 4).transpose(2, 3))


def _rgbx(h: int, w: int, seed: int = 0):
    """(3, h, w) uint8 view of RGBX memory, the layout the torch resize path produces."""
    import torch

    mem = torch.randint(0, 256, (h, w, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return mem.permute(2, 0, 1)[:3]


@pytest.mark.parametrize("exact", [False, True])
def test_native_kernel_gives_the_torch_bits_on_every_layout(exact):
    """The C kernel must agree bit for bit with the torch ops it replaces, on the strided views
    the families hand it: RGBX tiles, packed RGB, planar, a transposed view, a stack of tiles."""
    import torch

    import vlmkit.processing.images as images

    require_native_kernel()
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    g = torch.Generator().manual_seed(3)
    rgb = torch.randint(0, 256, (31, 45, 3), dtype=torch.uint8, generator=g)
    views = {
        "rgbx window": _rgbx(50, 70)[:, 5:37, 11:60],
        "packed rgb": rgb.permute(2, 0, 1),
        "planar": torch.randint(0, 256, (3, 17, 29), dtype=torch.uint8, generator=g),
        "transposed": rgb.permute(2, 1, 0),
        "tile stack": _rgbx(64, 64).reshape(3, 2, 32, 2, 32).permute(1, 3, 0, 2, 4).reshape(4, 3, 32, 32),
    }
    for name, src in views.items():
        want = images.normalize_(src.float(), mean, std, exact=exact)
        got = images.normalize_into(src, torch.empty(src.shape), mean, std, exact)
        assert torch.equal(got, want), name
        # Into a strided slot of a larger output (a transposed destination takes the generic loop).
        big = torch.full((*src.shape[:-1], src.shape[-1] + 3), 7.0)
        images.normalize_into(src, big[..., 2:-1], mean, std, exact)
        assert torch.equal(big[..., 2:-1], want) and (big[..., :2] == 7).all() and (big[..., -1] == 7).all(), name
        tdst = torch.empty(src.shape[:-2] + src.shape[-2:][::-1]).transpose(-1, -2)
        assert torch.equal(images.normalize_into(src, tdst, mean, std, exact), want), name
    with pytest.raises(TypeError, match="uint8 -> float32"):
        images.normalize_into(torch.zeros(3, 2, 2), torch.zeros(3, 2, 2), mean, std)
    with pytest.raises(ValueError, match="matching"):
        images.normalize_into(torch.zeros(3, 2, 2, dtype=torch.uint8), torch.zeros(3, 2, 3), mean, std)
    with pytest.raises(ValueError, match="expanded"):
        images.normalize_into(torch.zeros(2, 3, 2, 2, dtype=torch.uint8), torch.zeros(1, 3, 2, 2).expand(2, 3, 2, 2), mean, std)


@pytest.mark.parametrize("top,left,h,w", [
    (84, 0, 504, 672),     # LLaVA-NeXT: centred, padded above and below
    (0, 0, 600, 1000),     # Llama 3.2 Vision: top-left, padded right and bottom, one tile all padding
    (0, 0, 700, 1400),     # Idefics3: the image overhangs the crop grid
    (0, 101, 672, 470),    # padded left and right
    (-5, 3, 600, 500),     # shifted out of the canvas at the top
])
def test_tiles_into_equals_cutting_a_zero_canvas(pixel_path, top, left, h, w):
    import torch

    from vlmkit.processing.images import pad_value, tiles_into, to_normalized

    rows, cols, t = 2, 2, 336
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    image = _rgbx(h, w, seed=top + left)
    canvas = torch.zeros((3, rows * t, cols * t), dtype=torch.uint8)
    ys, xs = max(top, 0), max(left, 0)
    ye, xe = min(top + h, rows * t), min(left + w, cols * t)
    canvas[:, ys:ye, xs:xe] = image[:, ys - top : ye - top, xs - left : xe - left]
    for exact in (False, True):
        want = to_normalized(canvas.view(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t),
                             mean, std, exact=exact)
        got = tiles_into(image, torch.full((rows * cols, 3, t, t), float("nan")), rows, cols, mean, std, exact, top, left)
        assert torch.equal(got, want)
    assert torch.equal(pad_value(mean, std), torch.full((3, 1, 1), -1.0))
    with pytest.raises(ValueError, match="out must be"):
        tiles_into(image, torch.empty(3, 3, t, t), rows, cols, mean, std)


@pytest.mark.parametrize("zero_copy", [True, False])
def test_resize_into_channels_last_equals_interpolate(monkeypatch, zero_copy):
    """The out= resize (no layout-conversion copy) gives exactly F.interpolate's pixels, from
    RGBX memory (Pillow's Arrow export) and from the packed-RGB copy used without it."""
    import torch
    import torch.nn.functional as F

    import vlmkit.processing.images as images
    from vlmkit.processing.images import Resizer

    if not zero_copy:
        monkeypatch.setattr(images, "_zero_copy_rgbx", lambda image: None)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (97, 131, 3), dtype=np.uint8))
    for resample in ("bicubic", "bilinear"):
        r = Resizer(img, resample)
        src = r._source()
        assert src.shape[1] == (4 if zero_copy else 3)
        for h, w in ((40, 70), (200, 90), (97, 131)):
            got = r.resize(h, w)
            want = F.interpolate(src.contiguous(), size=(h, w), mode=resample, antialias=True)[0, :3]
            if (h, w) == (97, 131):
                want = src[0, :3]
            assert got.shape == (3, h, w) and torch.equal(got, want), (resample, h, w)


@pytest.mark.parametrize("run", [1, 5, 8, 14, 23])
def test_copy_into_equals_torch_copy(pixel_path, run):
    """Short-run strided copies (patch layouts): every run length, expanded sources, any rank."""
    import torch

    from vlmkit.processing.images import copy_into

    g = torch.Generator().manual_seed(run)
    src = torch.randn(3, 6, 2 * run, generator=g)
    view = src.view(3, 6, 2, run).permute(1, 2, 0, 3).unsqueeze(2).expand(6, 2, 2, 3, run)
    dst = torch.full((6, 2, 2, 3, run + 2), float("nan"))[..., 1:-1]
    copy_into(view, dst)
    assert torch.equal(dst, view) and dst._base[..., 0].isnan().all() and dst._base[..., -1].isnan().all()
    flat = torch.empty(6, 2, 2, 3, run)
    assert torch.equal(copy_into(view, flat), view)


@pytest.mark.parametrize("size", [(1024, 768), (333, 901), (1500, 260)])
def test_every_family_gives_the_same_bits_with_and_without_the_c_kernel(monkeypatch, size):
    import torch

    import vlmkit.processing.images as images
    from vlmkit.families.idefics3.processor import Idefics3Processor
    from vlmkit.processing.anyres import AnyResProcessor
    from vlmkit.families.internvl.processor import DynamicTileProcessor
    from vlmkit.families.pixtral.processor import PixtralProcessor
    from vlmkit.families.mllama.processor import MllamaProcessor
    from vlmkit.families.qwen2_vl.processor import Qwen2VLProcessor

    require_native_kernel()
    w, h = size
    img = Image.fromarray(np.random.default_rng(w).integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h))
    processors = [AnyResProcessor(), DynamicTileProcessor(max_num=6), Qwen2VLProcessor(max_pixels=400_000),
                  PixtralProcessor(), MllamaProcessor(), Idefics3Processor(longest_edge=728, backend="torch",
                                                                           resample="bicubic")]
    for proc in processors:
        monkeypatch.setenv("VLMKIT_NATIVE_PIXELS", "1")
        native = proc.preprocess(img).pixel_values
        monkeypatch.setenv("VLMKIT_NATIVE_PIXELS", "0")
        fallback = proc.preprocess(img).pixel_values
        assert native.shape == fallback.shape and torch.equal(native, fallback), type(proc).__name__
