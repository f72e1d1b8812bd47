"""LLaVA-OneVision (`llava_onevision`) import / export against transformers on a tiny random
folder: two images in one prompt (base views, one newline each) give the same input ids,
visual-token counts, pixels (docs/preprocessing.md's tolerance), logits (1e-4, fp32) and greedy
tokens as `LlavaOnevisionProcessor` over `LlavaOnevisionImageProcessorPil`; export back gives the
same tensors and transformers' reload matches; the `vlmkit` command imports, chats and exports it.
One image, on sizes below and above the anyres_max cap: tests/families/test_hf_parity.py. Video
is not imported (transformers' video processor needs torchvision)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _parity import first_stop, noise
from llava_onevision_folder import check_inputs, save_onevision

from vlmkit.checkpoint import load_checkpoint
from vlmkit.data.formats import Message
from vlmkit.generate import GenerationConfig, generate
from vlmkit.hf.registry import export_hf, family_of, import_hf, verify_hf_export
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    from transformers import LlavaOnevisionForConditionalGeneration

    root = tmp_path_factory.mktemp("onevision")
    folder = save_onevision(root / "hf")
    model, _ = load_checkpoint(import_hf(folder, root / "vlmkit"))
    ref = LlavaOnevisionForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    return folder, model, ref


def _assert_same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_onevision_two_images_in_one_prompt_match_transformers(onevision):
    folder, model, ref = onevision
    images = [noise(72, 40, seed=11), noise(30, 80, seed=12)]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "What is shown?"}]
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>\n" * len(images) + "What is shown?")], images)
    ids, inputs = check_inputs(folder, images, content, prompt, model)
    assert prompt.input_ids.tolist() == ids[0].tolist()
    inputs["input_ids"] = ids
    with torch.no_grad():
        ours = model(prompt.input_ids[None], visuals=VisualBatch(prompt.images)).logits
        theirs = ref(**inputs).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    expected = generate(model, [prompt], GenerationConfig(max_new_tokens=8))[0]
    out = ref.generate(**inputs, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = ref.generation_config.eos_token_id
    assert first_stop(out, set(eos if isinstance(eos, list) else [eos])) == expected


def test_onevision_cap_resizes_the_feature_map():
    """anyres_max_N: the layout shrinks exactly when the unpadded map exceeds 1.1x N tiles."""
    from vlmkit.families.llava_onevision.processor import AnyResMaxProcessor

    pinpoints = [[32 * i, 32 * j] for i in range(1, 5) for j in range(1, 5)]
    capped = AnyResMaxProcessor(image_size=32, patch_size=8, grid_pinpoints=pinpoints, max_tiles=4)
    free = AnyResMaxProcessor(image_size=32, patch_size=8, grid_pinpoints=pinpoints, max_tiles=0)
    assert capped.layout(100, 100).parts["feature_grid"] == [8, 8] and free.layout(100, 100).parts["feature_grid"] == [16, 16]
    assert capped.layout(40, 40).visual_tokens == free.layout(40, 40).visual_tokens
    assert capped.for_sample(1) is capped and capped.for_sample(2).layout(100, 30).visual_tokens == 16 + 1


def test_onevision_export_then_import_returns_the_same_tensors(onevision, tmp_path):
    import json

    _, model, _ = onevision
    exported = export_hf(model, tmp_path / "hf")
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["model_type"] == "llava_onevision" and cfg["vision_aspect_ratio"] == "anyres_max_4"
    assert verify_hf_export(model, exported) < 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    _assert_same_tensors(model, again)
    assert again.config.processor == model.config.processor
    assert family_of(again) == "llava_onevision"


def test_onevision_import_chat_and_export_from_the_command_line(tmp_path):
    from PIL import Image

    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repo / "src"), os.environ.get("PYTHONPATH", "")])}
    save_onevision(tmp_path / "hf", seed=3)
    Image.new("RGB", (37, 111), (200, 40, 40)).save(tmp_path / "odd.png")
    for args in (["import-hf", "hf", "ck"], ["chat", "--checkpoint", "ck", "--image", "odd.png", "What colour?", "--max-new-tokens", "3"],
                 ["export-hf", "--checkpoint", "ck", "back"]):
        out = subprocess.run([sys.executable, "-m", "vlmkit.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, f"vlmkit {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    assert (tmp_path / "back" / "model.safetensors").is_file()
