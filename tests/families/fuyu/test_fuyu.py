"""`vlmkit import-hf` for Fuyu (encoder-free, Persimmon LLM) on a tiny random folder saved with
`save_pretrained`: the processor settings it reads, the layout it promises on random sizes, export
back returning the same tensors (transformers' reload of the export matches), and the command line.
Ids, patches, logits and greedy tokens against transformers: tests/families/test_hf_parity.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _cli import vlmkit
from _parity import import_tiny, noise
from fuyu_folder import save_fuyu
from PIL import Image

from vlmkit.checkpoint import load_checkpoint
from vlmkit.hf.registry import export_hf, import_hf, verify_hf_export

REPO = Path(__file__).resolve().parents[3]

torch.set_num_threads(1)

@pytest.fixture(scope="module")
def fuyu(tmp_path_factory):
    return import_tiny(tmp_path_factory.mktemp("fuyu"), save_fuyu)


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
    from vlmkit.families.fuyu.processor import FuyuProcessor, fuyu_size

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
    vlmkit(tmp_path, "import-hf", "hf", "imported")
    noise(150, 37, seed=2).save(tmp_path / "odd.png")
    answer = vlmkit(tmp_path, "chat", "--checkpoint", "imported", "--image", "odd.png", "What is it?", "--max-new-tokens", "4")
    assert "Traceback" not in answer.stderr
    tokens = vlmkit(tmp_path, "tokens", "--checkpoint", "imported", "--size", "150x37")
    assert "Traceback" not in tokens.stderr
