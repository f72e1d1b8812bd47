"""Idefics3 (`idefics3`) import / export against transformers on a tiny random folder: two images
in one prompt (ids and logits), and export back returning the same tensors. One image (ids,
pixels, logits, greedy tokens): tests/families/test_hf_parity.py (`idefics3_folder.PARITY`)."""

from __future__ import annotations

import pytest
import torch
from _parity import import_tiny, noise
from idefics3_folder import idefics3_processor, save_idefics3

from vlmkit.checkpoint import load_checkpoint
from vlmkit.core.types import Message
from vlmkit.hf.registry import export_hf, import_hf
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def idefics3(tmp_path_factory):
    folder, _, model = import_tiny(tmp_path_factory.mktemp("idefics3"), save_idefics3)
    return folder, model


def test_idefics3_export_then_import_returns_the_same_tensors(idefics3, tmp_path):
    _, model = idefics3
    again, _ = load_checkpoint(import_hf(export_hf(model, tmp_path / "hf"), tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert again.config.processor == model.config.processor


def test_idefics3_two_images_in_one_prompt_match_transformers(idefics3):
    from transformers import Idefics3ForConditionalGeneration

    folder, model = idefics3
    images = [noise(72, 40, seed=13), noise(20, 20, seed=14)]
    hf_proc = idefics3_processor(folder)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]
    hf_inputs = hf_proc(images=[images], text=hf_proc.apply_chat_template(conversation, add_generation_prompt=True), return_tensors="pt")
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image><image>Same?")], images)
    assert prompt.input_ids.tolist() == hf_inputs["input_ids"][0].tolist()
    pixels = torch.cat([im.pixel_values for im in prompt.images])[None]
    assert pixels.shape == hf_inputs["pixel_values"].shape
    ref = Idefics3ForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        ours = model(prompt.input_ids[None], visuals=VisualBatch(prompt.images)).logits
        theirs = ref(**dict(hf_inputs, pixel_values=pixels)).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
