"""`vlmkit import-hf` for InternVL on a tiny random folder saved with `save_pretrained`: export
back returns the same tensors (transformers' reload of the export matches) and two images in one
prompt match transformers. Ids, pixels, logits and greedy tokens on one image:
tests/families/test_hf_parity.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _parity import import_tiny, noise
from internvl_folder import save_internvl

from vlmkit.checkpoint import load_checkpoint
from vlmkit.core.types import Message
from vlmkit.hf.registry import export_hf, import_hf, verify_hf_export
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    folder, _, model = import_tiny(tmp_path_factory.mktemp("internvl"), save_internvl)
    return folder, model


def test_internvl_export_then_import_returns_the_same_tensors(internvl, tmp_path):
    _, model = internvl
    exported = export_hf(model, tmp_path / "hf")
    assert verify_hf_export(model, exported) < 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert again.config.processor == model.config.processor


def test_internvl_two_images_in_one_prompt_match_transformers(internvl):
    from transformers import AutoTokenizer, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    folder, model = internvl
    images = [noise(72, 40, seed=15), noise(30, 80, seed=16)]
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    counts = GotOcr2ImageProcessorPil.from_pretrained(folder, local_files_only=True)(images=images, return_tensors="pt")["num_patches"]
    seq = json.loads((Path(folder) / "processor_config.json").read_text())["image_seq_length"]
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]
    rendered = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    for n in counts:  # InternVLProcessor expands the placeholders in order
        rendered = rendered.replace("<IMG_CONTEXT>\n", "<img>" + "<IMG_X>" * (seq * int(n)) + "</img>\n", 1)
    ref_ids = tok(rendered.replace("<IMG_X>", "<IMG_CONTEXT>"), add_special_tokens=False)["input_ids"]
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>\n<image>\nSame?")], images)
    assert prompt.input_ids.tolist() == ref_ids
    ref = InternVLForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        ours = model(prompt.input_ids[None], visuals=VisualBatch(prompt.images)).logits
        theirs = ref(input_ids=prompt.input_ids[None], pixel_values=torch.cat([im.pixel_values for im in prompt.images])).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
