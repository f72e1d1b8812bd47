"""Images per second: vlmkit's preprocessing vs the Hugging Face PIL processor, same images.

    .venv/bin/python benchmarks/preprocess_speed.py                 # LLaVA-NeXT, 1024x768
    .venv/bin/python benchmarks/preprocess_speed.py --family all --size 1024x768 --images 40

One thread (torch and the HF numpy path both), PIL images in memory, outputs checked against
each other on every image before timing (max difference in 0..255 intensity levels).
`VLMKIT_NATIVE_PIXELS=0` measures the torch fallback instead of the C conversion kernel.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image


def make_images(n: int, w: int, h: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        out.append(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR))
    return out


def families():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlmkit.families.qwen2_vl.processor import Qwen2VLProcessor
    from vlmkit.processing.anyres import LLAVA_NEXT_PINPOINTS, AnyResProcessor
    from vlmkit.families.internvl.processor import DynamicTileProcessor
    from vlmkit.processing.images import IMAGENET_MEAN, IMAGENET_STD
    from vlmkit.families.mllama.processor import MllamaProcessor
    from vlmkit.families.pixtral.processor import PixtralProcessor

    return {
        "llava-next": (
            AnyResProcessor(),
            LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                       image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS]),
            lambda o: o["pixel_values"][0],
        ),
        "internvl": (
            DynamicTileProcessor(),
            GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, max_patches=12,
                                     image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)),
            lambda o: o["pixel_values"],
        ),
        "qwen2-vl": (Qwen2VLProcessor(), Qwen2VLImageProcessorPil(), lambda o: o["pixel_values"]),
        "pixtral": (PixtralProcessor(), PixtralImageProcessorPil(), lambda o: o["pixel_values"]),
        "mllama": (
            MllamaProcessor(),
            MllamaImageProcessorPil(size={"height": 560, "width": 560}, max_image_tiles=4),
            lambda o: o["pixel_values"][0, 0],
        ),
    }


def rate(fn, images, min_seconds: float) -> float:
    fn(images[0])
    done, start = 0, time.perf_counter()
    while True:
        for img in images:
            fn(img)
        done += len(images)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="llava-next", help="llava-next, internvl, qwen2-vl, pixtral, mllama or all")
    ap.add_argument("--size", default="1024x768")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum timing window per side")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    w, h = (int(v) for v in args.size.lower().split("x"))
    images = make_images(args.images, w, h)
    fams = families()
    names = list(fams) if args.family == "all" else [args.family]
    from vlmkit.processing.images import native_pixels

    kernel = "C extension" if native_pixels() else "torch fallback"
    results = []
    for name in names:
        ours, hf, get = fams[name]
        std = np.asarray(ours.std, dtype=np.float32)
        worst = 0.0
        for img in images:
            ref = get(hf(img, return_tensors="np"))
            got = ours.preprocess(img).pixel_values.numpy()
            assert got.shape == ref.shape, (name, got.shape, ref.shape)
            diff = np.abs(got - ref)
            diff = diff.reshape(-1, 3, diff.shape[-1] // 3) if name == "qwen2-vl" else diff
            levels = diff * (std.reshape(1, 3, 1) if name == "qwen2-vl" else std.reshape(3, 1, 1)) * 255
            worst = max(worst, float(levels.max()))
        hf_rate = rate(lambda im: hf(im, return_tensors="np"), images, args.seconds)
        our_rate = rate(ours.preprocess, images, args.seconds)
        results.append({"family": name, "size": f"{w}x{h}", "hf_images_per_s": round(hf_rate, 1),
                        "vlmkit_images_per_s": round(our_rate, 1), "speedup": round(our_rate / hf_rate, 2),
                        "max_diff_levels": round(worst, 2), "pixels_kernel": kernel})
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"uint8 -> float conversion: {kernel}")
    print(f"{'family':<12} {'size':<10} {'HF img/s':>9} {'vlmkit img/s':>13} {'speedup':>8} {'max diff (0-255)':>17}")
    for r in results:
        print(f"{r['family']:<12} {r['size']:<10} {r['hf_images_per_s']:>9} {r['vlmkit_images_per_s']:>13} "
              f"{r['speedup']:>7}x {r['max_diff_levels']:>17}")


if __name__ == "__main__":
    main()
