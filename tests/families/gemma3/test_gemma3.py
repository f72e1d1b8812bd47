"""`vlmkit import-hf` of Gemma 3 against transformers on a tiny random folder: two images in one
prompt (ids, pixels, logits with each image's tokens attending to each other, greedy tokens), a
pan-and-scan folder refused, and the export round trip. One image:
tests/families/test_hf_parity.py (`gemma3_folder.PARITY`)."""

from __future__ import annotations

import pytest
import torch
from _parity import first_stop, import_tiny, noise
from gemma3_folder import gemma3_inputs, save_gemma3

from vlmkit.checkpoint import load_checkpoint
from vlmkit.core.types import Message
from vlmkit.generate import GenerationConfig, generate
from vlmkit.hf.registry import export_hf, import_hf, verify_hf_export
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    folder, _, model = import_tiny(tmp_path_factory.mktemp("gemma3"), save_gemma3)
    return folder, model


def _check(model, folder, images, question):
    from transformers import Gemma3ForConditionalGeneration

    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>" * len(images) + question)], images)
    inputs = gemma3_inputs(model, folder, prompt, images, question)
    ref = Gemma3ForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(prompt.input_ids[None], visuals=VisualBatch(prompt.images)).logits
        theirs = ref(**inputs).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)

    expected = generate(model, [prompt], GenerationConfig(max_new_tokens=8))[0]
    out = ref.generate(**inputs, max_new_tokens=8, do_sample=False)[0, prompt.input_ids.shape[0]:].tolist()
    eos = ref.generation_config.eos_token_id
    assert first_stop(out, set(eos if isinstance(eos, list) else [eos])) == expected


def test_gemma3_two_images_in_one_prompt_match_transformers(gemma3):
    folder, model = gemma3
    _check(model, folder, [noise(40, 30, seed=1), noise(30, 60, seed=2)], "Compare them.")


def test_gemma3_pan_and_scan_folder_is_refused(tmp_path):
    import json
    import shutil

    from vlmkit.hf.folder import ExportError

    folder = save_gemma3(tmp_path / "hf", seed=1)
    cfg_path = folder / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["image_processor"]["do_pan_and_scan"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="pan-and-scan"):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    shutil.rmtree(folder)


def test_gemma3_export_then_import_returns_the_same_tensors(gemma3, tmp_path):
    _, model = gemma3
    exported = export_hf(model, tmp_path / "hf")
    assert verify_hf_export(model, exported) < 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert again.config.processor == model.config.processor
    assert again.config.attention == "image"
