"""The token count a processor promises equals what its pixel output implies, for every size.

The model-side check (connector output length) lives with the model tests; here the pixels are
the ground truth: views x tokens per view, patches / merge, tiles x states.
"""

from __future__ import annotations


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlmkit.families.idefics3.processor import Idefics3Processor
from vlmkit.processing.anyres import AnyResProcessor, unpadded_grid
from vlmkit.families.internvl.processor import DynamicTileProcessor
from vlmkit.families.pixtral.processor import PixtralProcessor
from vlmkit.families.mllama.processor import MllamaProcessor
from vlmkit.families.qwen2_vl.processor import Qwen2VLProcessor, smart_resize
from vlmkit.registry import IMAGE_PROCESSORS

# Sizes: a long side and an aspect ratio, so extreme ratios are drawn as often as square ones.
sizes = st.tuples(st.integers(1, 2400), st.floats(1.0, 150.0), st.booleans()).map(
    lambda t: (t[0], max(1, int(t[0] / t[1]))) if t[2] else (max(1, int(t[0] / t[1])), t[0])
)
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def gray(w: int, h: int) -> Image.Image:
    return Image.new("RGB", (w, h), (90, 120, 200))


def implied_anyres(p: AnyResProcessor, out, w: int, h: int) -> int:
    views, _, s, _ = out.pixel_values.shape
    feat = s // p.patch_size
    grid_h, grid_w = out.layout.parts["grid"]
    assert views == 1 + grid_h * grid_w
    fh, fw = unpadded_grid(h, w, grid_h * feat, grid_w * feat)
    return feat * feat + fh * fw + fh


@FAST
@given(sizes)
def test_anyres_tokens_match_pixels(size):
    w, h = size
    p = AnyResProcessor()
    out = p.preprocess(gray(w, h))
    assert out.layout == p.layout(w, h)
    assert out.layout.visual_tokens == implied_anyres(p, out, w, h)


@FAST
@given(sizes)
def test_dynamic_tokens_match_pixels(size):
    w, h = size
    p = DynamicTileProcessor(max_num=12)
    out = p.preprocess(gray(w, h))
    views, _, s, _ = out.pixel_values.shape
    assert s == 448
    assert out.layout.visual_tokens == views * (s // 14) ** 2 // 4
    assert views == 1 or views == out.layout.parts["tiles"] + 1


@FAST
@given(sizes)
def test_qwen2vl_tokens_match_pixels(size):
    w, h = size
    p = Qwen2VLProcessor()
    if max(w, h) / min(w, h) > 200:
        with pytest.raises(ValueError, match="aspect ratio"):
            p.preprocess(gray(w, h))
        return
    out = p.preprocess(gray(w, h))
    t, gh, gw = out.extra["image_grid_thw"]
    assert out.pixel_values.shape == (gh * gw, 3 * 2 * 14 * 14)
    assert out.layout.visual_tokens == out.pixel_values.shape[0] // 4
    rh, rw = gh * 14, gw * 14
    assert rh % 28 == 0 and rw % 28 == 0 and 3136 <= rh * rw <= 28 * 28 * 1280


@FAST
@given(sizes)
def test_pixtral_tokens_match_pixels(size):
    w, h = size
    p = PixtralProcessor()
    out = p.preprocess(gray(w, h))
    _, _, rh, rw = out.pixel_values.shape
    assert max(rh, rw) <= 1024 and rh % 16 == 0 and rw % 16 == 0
    assert out.layout.visual_tokens == (rh // 16) * (rw // 16)
    text = p.placeholder_text(out.layout, "[IMG]")
    assert text.count("[IMG]") == out.layout.visual_tokens
    assert text.count("[IMG_BREAK]") == rh // 16 - 1 and text.endswith("[IMG_END]")


@FAST
@given(sizes)
def test_mllama_tokens_match_pixels(size):
    w, h = size
    p = MllamaProcessor()
    out = p.preprocess(gray(w, h))
    assert out.pixel_values.shape == (4, 3, 560, 560)
    used = int(out.extra["aspect_ratio_mask"].sum())
    assert out.layout.visual_tokens == used * ((560 // 14) ** 2 + 1)
    assert torch.all(out.pixel_values[used:] == 0)  # unused slots are zeros, as in transformers
    assert p.placeholder_text(out.layout, "<|image|>") == "<|image|>"


@FAST
@given(sizes)
def test_idefics3_tokens_match_pixels(size):
    w, h = size
    p = Idefics3Processor()
    out = p.preprocess(gray(w, h))
    views = out.pixel_values.shape[0]
    assert out.pixel_values.shape[1:] == (3, 364, 364)
    assert out.layout.visual_tokens == views * (364 // 14) ** 2 // 4
    text = p.placeholder_text(out.layout, "<image>")
    assert text.count("<image>") == out.layout.visual_tokens


def test_every_family_is_registered_and_builds_from_config():
    from vlmkit.config import ProcessorConfig

    for name, size in [("anyres", 336), ("dynamic", 448), ("qwen2vl", 224), ("pixtral", 1024),
                       ("mllama", 560), ("idefics3", 364)]:
        assert name in IMAGE_PROCESSORS
        proc = IMAGE_PROCESSORS.build(name, ProcessorConfig(name=name, image_size=size))
        assert proc.preprocess(gray(640, 480)).layout == proc.layout(640, 480)


def test_anyres_tie_goes_to_the_first_pinpoint():
    # 672x672 and 1008x336 both keep all of a 336x336 image; equal waste -> the first listed wins.
    p = AnyResProcessor(grid_pinpoints=((336, 672), (672, 336)))
    assert p.layout(336, 336).parts["best_resolution"] == [672, 336]
    p = AnyResProcessor(grid_pinpoints=((672, 336), (336, 672)))
    assert p.layout(336, 336).parts["best_resolution"] == [336, 672]


def test_internvl_area_rule_on_ratio_ties():
    p = DynamicTileProcessor(max_num=12)
    # A square image ties 1x1, 2x2 and 3x3 on ratio; a larger grid replaces the current one while
    # the image area exceeds half of that grid's area: 0.5*448^2*4 = 401,408 (side 633.6) and
    # 0.5*448^2*9 = 903,168 (side 950.4).
    assert p.grid(633, 633) == (1, 1)
    assert p.grid(634, 634) == (2, 2)
    assert p.grid(950, 950) == (2, 2)
    assert p.grid(951, 951) == (3, 3)
    assert p.layout(1024, 1024).visual_tokens == (9 + 1) * 256


def test_qwen2vl_smart_resize_rules():
    assert smart_resize(42, 42) == (56, 56)  # 1.5 -> 2 (half to even)
    assert smart_resize(70, 70) == (56, 56)  # 2.5 -> 2 (half to even)
    assert smart_resize(98, 98) == (112, 112)  # 3.5 -> 4
    # transformers scales the whole image up to min_pixels (qwen_vl_utils would give 28x1008).
    assert smart_resize(10, 1000) == (28, 560)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 201)
    h, w = smart_resize(4000, 3000, max_pixels=28 * 28 * 1280)
    assert h * w <= 28 * 28 * 1280 and h % 28 == 0 and w % 28 == 0
