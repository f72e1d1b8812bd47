"""Parity with the Hugging Face transformers `*ImageProcessorPil` reference processors.

Every family is checked on the same list of sizes (extreme and near-tie aspect ratios, sizes a
pixel either side of tile / factor boundaries, round-half cases) for: the grid (number of
views), the resized size, the token count and the pixel values.

Pixel tolerance: with `backend="pil"` vlmkit calls the same PIL resize and the same float32
normalisation order, so values must be identical (atol 0). The default `backend="torch"` uses
torch's antialiased uint8 resize; on smooth images it is within 2 of 255 intensity levels of
PIL: at most 3 of 255 intensity levels (3/255/std after normalisation), and at least 85%
of values identical. (On white noise with one axis upscaled and the other downscaled it can be
worse: Pillow then runs the two passes in the other order and clips between them.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlmkit.families.idefics3.processor import Idefics3Processor
from vlmkit.processing.anyres import LLAVA_NEXT_PINPOINTS, AnyResProcessor
from vlmkit.families.internvl.processor import DynamicTileProcessor
from vlmkit.processing.images import IMAGENET_MEAN, IMAGENET_STD
from vlmkit.families.pixtral.processor import PixtralProcessor
from vlmkit.families.mllama.processor import MllamaProcessor
from vlmkit.families.qwen2_vl.processor import Qwen2VLProcessor

# (width, height)
SIZES = [
    (1024, 768), (768, 1024), (336, 336), (337, 335), (672, 336), (673, 336), (1008, 336),
    (1, 1), (3, 700), (700, 3), (28, 28), (42, 42), (70, 14), (560, 560), (561, 1120),
    (1250, 1000), (1000, 1250), (448, 1344), (1456, 60), (364, 365), (2000, 1500), (1025, 1024),
]


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A low-frequency RGB image (photo-like: bicubic upsampling of coarse noise)."""
    rng = np.random.default_rng(seed + width * 7919 + height)
    coarse = rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)


def hf_llava_next():
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS],
    )


def llava_next_hf_tokens(width: int, height: int) -> int:
    # The processor's own formula, without a tokenizer: build it bare and set what it reads.
    proc = LlavaNextProcessor.__new__(LlavaNextProcessor)
    proc.image_processor = hf_llava_next()
    proc.patch_size, proc.num_additional_image_tokens = 14, 1
    n = proc._get_number_of_features(height, width, 336, 336)
    return n - 1  # vision_feature_select_strategy="default" drops the CLS slot


FAMILIES = {
    "llava-next": (
        lambda be: AnyResProcessor(backend=be),
        hf_llava_next,
        lambda out: out["pixel_values"][0],
    ),
    "internvl": (
        lambda be: DynamicTileProcessor(backend=be),
        lambda: GotOcr2ImageProcessorPil(
            size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1, max_patches=12,
            image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        ),
        lambda out: out["pixel_values"],
    ),
    "qwen2-vl": (lambda be: Qwen2VLProcessor(backend=be), Qwen2VLImageProcessorPil, lambda out: out["pixel_values"]),
    "pixtral": (lambda be: PixtralProcessor(backend=be), PixtralImageProcessorPil, lambda out: out["pixel_values"]),
    "mllama": (
        lambda be: MllamaProcessor(backend=be),
        lambda: MllamaImageProcessorPil(size={"height": 560, "width": 560}, max_image_tiles=4),
        lambda out: out["pixel_values"][0, 0],
    ),
    "idefics3": (
        lambda be: Idefics3Processor(backend=be),
        lambda: Idefics3ImageProcessorPil(size={"longest_edge": 1456}, max_image_size={"longest_edge": 364}),
        lambda out: out["pixel_values"][0],
    ),
}

_HF_CACHE: dict = {}


def hf_pixels(family: str, image: Image.Image) -> np.ndarray:
    key = (family, image.size)
    if key not in _HF_CACHE:
        _, make_hf, get = FAMILIES[family]
        _HF_CACHE[key] = get(make_hf()(image, return_tensors="np"))
    return _HF_CACHE[key]


def usable(family: str, w: int, h: int) -> bool:
    # Qwen2-VL refuses aspect ratios above 200 (tested separately); every other size is valid.
    return not (family == "qwen2-vl" and max(w, h) / min(w, h) > 200)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pixels_bit_exact_with_pil_backend(family):
    make, _, _ = FAMILIES[family]
    ours = make("pil")
    for w, h in SIZES:
        if not usable(family, w, h):
            continue
        img = smooth_image(w, h)
        ref = hf_pixels(family, img)
        got = ours.preprocess(img).pixel_values.numpy()
        assert got.shape == ref.shape, (family, w, h)
        np.testing.assert_array_equal(got, ref, err_msg=f"{family} {w}x{h}")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "idefics3"])  # idefics3 is PIL-only (Lanczos)
def test_pixels_close_with_torch_backend(family):
    make, _, _ = FAMILIES[family]
    ours = make("torch")
    std = np.asarray(ours.std, dtype=np.float32).reshape(3, 1, 1)
    for w, h in SIZES:
        if not usable(family, w, h):
            continue
        img = smooth_image(w, h)
        ref = hf_pixels(family, img)
        got = ours.preprocess(img).pixel_values.numpy()
        assert got.shape == ref.shape, (family, w, h)
        if family == "qwen2-vl":  # flat patches: channel is the slowest axis of each 1176 row
            levels = np.abs(got - ref).reshape(-1, 3, 2 * 14 * 14) * std.reshape(1, 3, 1) * 255
        else:
            levels = np.abs(got - ref) * std * 255
        assert levels.max() <= 3.01, (family, w, h, levels.max())
        assert (levels > 0.01).mean() <= 0.15, (family, w, h, (levels > 0.01).mean())


def test_llava_next_layout_matches_reference_over_many_sizes():
    ours = AnyResProcessor()
    hf = hf_llava_next()
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution

    rng = np.random.default_rng(1)
    sizes = [(int(a), int(b)) for a, b in rng.integers(1, 3000, (300, 2))] + SIZES
    # Exact ties between pinpoints (square images of every scale hit 672x672 vs 1008x336 ties).
    sizes += [(s, s) for s in range(300, 1100, 37)] + [(2 * s, s) for s in range(100, 800, 41)]
    for w, h in sizes:
        lay = ours.layout(w, h)
        best = select_best_resolution((h, w), [list(p) for p in LLAVA_NEXT_PINPOINTS])
        assert lay.parts["best_resolution"] == [best[1], best[0]]
        assert lay.parts["grid"] == [best[0] // 336, best[1] // 336]
        rh, rw = get_patch_output_size(np.zeros((3, h, w)), best, "channels_first")
        assert lay.parts["resized"] == [rw, rh]
        assert lay.visual_tokens == llava_next_hf_tokens(w, h), (w, h)
    assert len(hf.image_grid_pinpoints) == 5


def test_mllama_layout_matches_reference():
    from transformers.models.mllama.image_processing_pil_mllama import (
        get_image_size_fit_to_canvas, get_optimal_tiled_canvas)

    ours = MllamaProcessor()
    rng = np.random.default_rng(2)
    sizes = [(int(a), int(b)) for a, b in rng.integers(1, 4000, (300, 2))] + SIZES
    sizes += [(560 * a, 560 * b) for a in range(1, 5) for b in range(1, 5)]  # exact-scale ties
    for w, h in sizes:
        rows, cols, rh, rw = ours.plan(w, h)
        ch, cw = get_optimal_tiled_canvas(h, w, 4, 560)
        assert (rows * 560, cols * 560) == (int(ch), int(cw)), (w, h)
        assert (rh, rw) == tuple(int(v) for v in get_image_size_fit_to_canvas(h, w, int(ch), int(cw), 560))
        assert ours.layout(w, h).visual_tokens == rows * cols * 1601


def test_qwen2vl_layout_matches_reference_including_round_half():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    ours = Qwen2VLProcessor(min_pixels=3136, max_pixels=12845056)
    hf = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    # 14 * odd = exact .5 multiples of 28: Python rounds half to even (42 -> 56, 70 -> 56, 98 -> 112).
    sizes = [(14 * k, 14 * j) for k in range(1, 40, 2) for j in range(1, 40, 5)]
    rng = np.random.default_rng(3)
    sizes += [(int(a), int(b)) for a, b in rng.integers(1, 5000, (300, 2)) if max(a, b) / min(a, b) <= 200]
    for w, h in sizes:
        rh, rw = hf_smart_resize(h, w, 28, 3136, 12845056)
        lay = ours.layout(w, h)
        assert lay.parts["resized"] == [rw, rh]
        assert lay.parts["grid_thw"] == [1, rh // 14, rw // 14]
        assert lay.visual_tokens == hf.get_number_of_image_patches(h, w, {}) // 4
    assert ours.layout(42, 42).parts["resized"] == [56, 56]
    assert ours.layout(70, 70).parts["resized"] == [56, 56]  # 2.5 -> 2, half to even


def test_pixtral_layout_matches_reference():
    from transformers.models.pixtral.image_processing_pil_pixtral import get_resize_output_image_size

    ours = PixtralProcessor()
    rng = np.random.default_rng(4)
    sizes = [(int(a), int(b)) for a, b in rng.integers(1, 4000, (300, 2))] + SIZES
    for w, h in sizes:
        rh, rw = get_resize_output_image_size(np.zeros((3, h, w)), (1024, 1024), (16, 16), "channels_first")
        lay = ours.layout(w, h)
        assert lay.parts["resized"] == [rw, rh]
        assert lay.visual_tokens == (rh // 16) * (rw // 16)
        assert lay.special_tokens == rh // 16  # [IMG_BREAK] per row, the last one is [IMG_END]
    assert ours.layout(512, 512).visual_tokens == 1024


def test_internvl_grid_matches_transformers_port():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    ours = DynamicTileProcessor(max_num=12)
    rng = np.random.default_rng(5)
    sizes = [(int(a), int(b)) for a, b in rng.integers(1, 4000, (400, 2))] + SIZES
    for w, h in sizes:
        assert ours.grid(w, h) == tuple(get_optimal_tiled_canvas((h, w), (448, 448), 1, 12)), (w, h)


def test_idefics3_crop_count_matches_reference_accounting():
    hf = Idefics3ImageProcessorPil(size={"longest_edge": 1456}, max_image_size={"longest_edge": 364})
    ours = Idefics3Processor()
    rng = np.random.default_rng(6)
    sizes = [(int(a), int(b)) for a, b in rng.integers(1, 5000, (400, 2))] + SIZES
    for w, h in sizes:
        rows, cols = ours.layout(w, h).parts["grid"]
        assert hf.get_number_of_image_patches(h, w, {}) == ((rows * cols + 1) if rows else 0, rows, cols), (w, h)
        assert ours.layout(w, h).visual_tokens == max(rows * cols + 1, 1) * 169
