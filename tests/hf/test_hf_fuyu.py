"""`vlmkit import-hf` for Fuyu (encoder-free, Persimmon LLM) against transformers on a tiny random
folder saved with `save_pretrained`: the same input ids and patch counts as FuyuProcessor's layout
(its PIL image processor's own patches and replacement text), the same patches (padding included),
logits within 1e-4 (fp32), the same greedy tokens, images smaller and larger than the canvas;
export back returns the same tensors and transformers' reload of the export matches."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.data.formats import Message
from vlmkit.generate import GenerationConfig, generate
from vlmkit.hf.registry import export_hf, import_hf, verify_hf_export
from vlmkit.processing import build_chat_processor
from vlmkit.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from _hf_folders_fuyu import save_fuyu  # noqa: E402

torch.set_num_threads(1)

# docs/preprocessing.md: resized pixels within 3 of 255 intensity levels of the reference.
PIXEL_TOLERANCE = 3 / 255


def noise(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    small = (torch.rand(max(1, h // 4), max(1, w // 4), 3, generator=g) * 255).byte().numpy()
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


@pytest.fixture(scope="module")
def fuyu(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuyu")
    folder = save_fuyu(root / "hf")
    ckpt = import_hf(folder, root / "vlmkit")
    model, _ = load_checkpoint(ckpt)
    return folder, ckpt, model


def _reference(folder, image, text):
    """What FuyuProcessor produces. Its `__call__` cannot run with the PIL image processor (it hands
    torch tensors to the PIL processor's numpy `patchify_image`), so its `_process_images` steps are
    taken here with the PIL processor's own pieces: crop the padded canvas to the unpadded size
    rounded up to whole patches, patchify, the processor's replacement text (rows of |SPEAKER| +
    |NEWLINE|, then <s>), then the text with <0x04> (beginning of answer) appended."""
    from transformers import AutoTokenizer, FuyuProcessor
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ip = FuyuImageProcessorPil.from_pretrained(folder, local_files_only=True)
    proc = FuyuProcessor(image_processor=ip, tokenizer=tok)
    out = ip([image])
    canvas = np.asarray(out["images"][0][0])
    p = ip.patch_size["height"] if isinstance(ip.patch_size, dict) else ip.patch_size.height
    h = min(canvas.shape[-2], math.ceil(out["image_unpadded_heights"][0][0] / p) * p)
    w = min(canvas.shape[-1], math.ceil(out["image_unpadded_widths"][0][0] / p) * p)
    patches = torch.from_numpy(ip.patchify_image(canvas[..., :h, :w]))
    replacement = proc.replace_image_token(None, image_idx=0, num_patches=(h // p) * (w // p), row_width=w // p)
    ids = tok(replacement, add_special_tokens=False)["input_ids"] + tok(text + "<0x04>", add_special_tokens=False)["input_ids"]
    return torch.tensor(ids), patches


def _first_stop(tokens: list[int], stops: set[int]) -> list[int]:
    return tokens[: next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]


@pytest.mark.parametrize("size", [(40, 30), (100, 30), (200, 150), (13, 7), (72, 48)])
def test_fuyu_import_ids_patches_logits_and_greedy_match_transformers(fuyu, size):
    from transformers import FuyuForCausalLM

    folder, _, model = fuyu
    image = noise(*size, seed=sum(size))
    ref_ids, ref_patches = _reference(folder, image, "What is shown?")
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>What is shown?")], [image])
    assert prompt.input_ids.tolist() == ref_ids.tolist()
    # vlmkit's chat / eval write "<image>\n" before the question: the newline is no part of the text.
    chatty = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>\nWhat is shown?")], [image])
    assert chatty.input_ids.tolist() == ref_ids.tolist()
    assert model.count_image_tokens(prompt.images[0]) == int((ref_ids == model.image_token_id).sum()) == ref_patches.shape[0]
    ours_patches = model.vision(prompt.images[0].pixel_values)[0]
    std = torch.tensor(model.config.processor.std).repeat(ours_patches.shape[1] // 3)
    assert ((ours_patches - ref_patches).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6

    ref = FuyuForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    ids = prompt.input_ids[None]
    with torch.no_grad():
        ours = model(ids, images=prompt.images).logits
        theirs = ref(input_ids=ids, pixel_values=ours_patches).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)

    expected = generate(model, [prompt], GenerationConfig(max_new_tokens=8))[0]
    out = ref.generate(input_ids=ids, pixel_values=ours_patches, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = ref.generation_config.eos_token_id
    assert _first_stop(out, set(eos if isinstance(eos, list) else [eos])) == expected


def test_fuyu_import_reads_processor_settings(fuyu):
    _, ckpt, model = fuyu
    p = model.config.processor
    assert p.name == "fuyu" and p.resample == "bilinear"
    assert (p.options["max_height"], p.options["max_width"], p.options["patch_size"]) == (48, 72, 6)
    assert tuple(p.mean) == pytest.approx((0.5, 0.4, 0.3)) and tuple(p.std) == pytest.approx((0.25, 0.3, 0.35))
    assert model.config.vision.name == "patchify" and model.config.connector.name == "patch-embed"
    # (The patchify "tower" has no weights at all.)
    assert "llm" in model.pretrained_parts and (ckpt / "llm" / "model.safetensors").is_file()


def test_fuyu_export_then_import_returns_the_same_tensors(fuyu, tmp_path):
    _, _, model = fuyu
    pad_before = model.tokenizer.pad_token_id
    exported = export_hf(model, tmp_path / "hf")
    assert model.tokenizer.pad_token_id == pad_before  # FuyuProcessor got a copy
    assert json.loads((exported / "config.json").read_text())["model_type"] == "fuyu"
    assert verify_hf_export(model, exported) < 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert again.config.processor == model.config.processor


def test_fuyu_layout_matches_transformers_on_random_sizes(fuyu):
    """The patch grid vlmkit promises (without touching pixels) is the one FuyuImageProcessorPil's
    resize gives, on sizes below, across and above the 72x48 canvas."""
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    folder, _, model = fuyu
    ip = FuyuImageProcessorPil.from_pretrained(folder, local_files_only=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        w, h = (int(x) for x in torch.randint(1, 400, (2,), generator=g))
        out = ip([Image.new("RGB", (w, h))])
        rows = math.ceil(out["image_unpadded_heights"][0][0] / 6)
        cols = math.ceil(out["image_unpadded_widths"][0][0] / 6)
        assert model.image_processor.layout(w, h).parts["grid"] == [rows, cols], (w, h)


def test_fuyu_processor_layout_matches_its_pixels():
    from vlmkit.processing.fuyu import FuyuProcessor, fuyu_size

    proc = FuyuProcessor(max_height=60, max_width=90, patch_size=10)
    assert fuyu_size(30, 40, 60, 90) == (30, 40)  # never upscaled
    assert fuyu_size(120, 90, 60, 90) == (60, 45)  # scaled down, aspect kept
    for w, h in [(7, 3), (90, 60), (300, 50), (33, 61)]:
        image = proc.preprocess(Image.new("RGB", (w, h), (10, 200, 30)))
        rows, cols = image.layout.parts["grid"]
        assert image.pixel_values.shape[-2:] == (rows * 10, cols * 10)
        assert image.layout.visual_tokens == rows * cols
        text = proc.placeholder_text(image.layout, "<I>")
        assert text == ("<I>" * cols + "|NEWLINE|") * rows + "<s>"
    with pytest.raises(ValueError, match="multiple of the patch size"):
        FuyuProcessor(max_height=65, max_width=90, patch_size=10)


def test_fuyu_imports_and_chats_from_the_command_line(tmp_path):
    save_fuyu(tmp_path / "hf")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}

    def run(args):
        out = subprocess.run([sys.executable, "-m", "vlmkit.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, f"vlmkit {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
        return out

    run(["import-hf", "hf", "imported"])
    noise(150, 37, seed=2).save(tmp_path / "odd.png")
    answer = run(["chat", "--checkpoint", "imported", "--image", "odd.png", "What is it?", "--max-new-tokens", "4"])
    assert "Traceback" not in answer.stderr
    tokens = run(["tokens", "--checkpoint", "imported", "--size", "150x37"])
    assert "Traceback" not in tokens.stderr
