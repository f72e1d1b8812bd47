"""`vlmkit import-hf` for LLaVA-NeXT on tiny random folders saved with `save_pretrained`: a SigLIP
tower imports with equal logits, export back returns the same tensors, `vlmkit tokens` reads the
imported processor, and two images in one prompt match transformers. Ids, pixels, logits and
greedy tokens on one image: tests/families/test_hf_parity.py."""

from __future__ import annotations

import json

import pytest
import torch
from _parity import import_tiny, noise
from llava_next_folder import llava_next_processor, save_llava_next
from typer.testing import CliRunner

from vlmkit.checkpoint import load_checkpoint
from vlmkit.cli import app
from vlmkit.core.types import Message
from vlmkit.hf.registry import export_hf, import_hf
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    return import_tiny(tmp_path_factory.mktemp("llava_next"), save_llava_next)


def _assert_same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_llava_next_siglip_tower_imports_with_equal_logits(tmp_path):
    from transformers import LlavaNextForConditionalGeneration

    folder = save_llava_next(tmp_path / "hf", tower="siglip", seed=2)
    model, _ = load_checkpoint(import_hf(folder, tmp_path / "vlmkit"))
    image = noise(50, 90, seed=3)
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>\nWhat?")], [image])
    ref = LlavaNextForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        ours = model(prompt.input_ids[None], visuals=VisualBatch(prompt.images)).logits
        theirs = ref(input_ids=prompt.input_ids[None], pixel_values=prompt.images[0].pixel_values[None],
                     image_sizes=torch.tensor([[90, 50]])).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_llava_next_export_then_import_returns_the_same_tensors(llava_next, tmp_path):
    _, _, model = llava_next
    exported = export_hf(model, tmp_path / "hf")
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    _assert_same_tensors(model, again)
    assert again.config.processor == model.config.processor


def test_tokens_command_reads_the_imported_llava_next_processor(llava_next):
    _, ckpt, model = llava_next
    for w, h in [(72, 40), (24, 90)]:
        result = CliRunner().invoke(app, ["tokens", "--checkpoint", str(ckpt), "--size", f"{w}x{h}", "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>\nWhat?")], [noise(w, h, seed=1)])
        assert report["visual_tokens"] == int((prompt.input_ids == model.image_token_id).sum())
        assert report["context"] == 4096


def test_llava_next_two_images_in_one_prompt_match_transformers(llava_next):
    from transformers import LlavaNextForConditionalGeneration

    folder, _, model = llava_next
    images = [noise(72, 40, seed=11), noise(30, 80, seed=12)]
    hf_proc = llava_next_processor(folder)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]
    hf_inputs = hf_proc(images=images, text=hf_proc.apply_chat_template(conversation, add_generation_prompt=True), return_tensors="pt")
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>\n<image>\nSame?")], images)
    assert prompt.input_ids.tolist() == hf_inputs["input_ids"][0].tolist()
    views = hf_inputs["pixel_values"].shape[1]
    pixels = torch.zeros_like(hf_inputs["pixel_values"])
    for i, im in enumerate(prompt.images):
        pixels[i, : im.pixel_values.shape[0]] = im.pixel_values
    assert views == max(im.pixel_values.shape[0] for im in prompt.images)
    ref = LlavaNextForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        ours = model(prompt.input_ids[None], visuals=VisualBatch(prompt.images)).logits
        theirs = ref(**dict(hf_inputs, pixel_values=pixels)).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
