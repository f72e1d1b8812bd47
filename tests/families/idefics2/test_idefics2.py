"""Idefics2 (`idefics2`) import / export against transformers on tiny random folders: with image
splitting, two images in one prompt (ids, pixels, logits fed transformers' own padded pixels and
masks, greedy tokens); vlmkit's `perceiver` connector computes `Idefics2Connector` exactly;
export back gives the same tensors and transformers' reload matches; the `vlmkit` command
imports, chats and exports it; a training sample supervises the assistant turn only. One image,
starting with the image and with text: tests/families/test_hf_parity.py (`idefics2_folder.PARITY`).

Idefics2's template writes "User:" before a turn whose first part is an image and "User: "
otherwise; the prompts here start with text or with the images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _parity import noise
from idefics2_folder import check_against_transformers, save_idefics2

from vlmkit.checkpoint import load_checkpoint
from vlmkit.core.types import Message
from vlmkit.hf.registry import export_hf, family_of, import_hf, verify_hf_export
from vlmkit.processing import build_chat_processor

REPO = Path(__file__).resolve().parents[3]

torch.set_num_threads(1)


def _imported(root: Path, split: bool):
    from transformers import Idefics2ForConditionalGeneration

    folder = save_idefics2(root / "hf", split=split, seed=int(split))
    model, _ = load_checkpoint(import_hf(folder, root / "vlmkit"))
    ref = Idefics2ForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    return folder, model, ref


@pytest.fixture(scope="module")
def idefics2(tmp_path_factory):
    return _imported(tmp_path_factory.mktemp("idefics2"), split=False)


@pytest.fixture(scope="module")
def idefics2_split(tmp_path_factory):
    return _imported(tmp_path_factory.mktemp("idefics2-split"), split=True)


@pytest.mark.parametrize("size", [(72, 40), (50, 45)])
def test_idefics2_split_images_match_transformers(idefics2_split, size):
    check_against_transformers(*idefics2_split, [noise(*size, seed=6)])


def test_idefics2_two_images_in_one_prompt_match_transformers(idefics2, idefics2_split):
    images = [noise(72, 40, seed=11), noise(30, 80, seed=12)]
    check_against_transformers(*idefics2, images)
    check_against_transformers(*idefics2, images, greedy=False, leading=True)
    check_against_transformers(*idefics2_split, images, greedy=False)


def test_perceiver_connector_is_idefics2_connector(idefics2):
    """vlmkit's perceiver (as the import configures it) and transformers' Idefics2Connector give
    the same latents from the same weights."""
    from transformers import Idefics2Config
    from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector

    from vlmkit.families.idefics2.hf import their_connector_key

    folder, model, _ = idefics2
    cfg = Idefics2Config.from_pretrained(folder)
    theirs = Idefics2Connector(cfg).eval()
    theirs.load_state_dict({their_connector_key(k): v for k, v in model.connector.state_dict().items()})
    features = torch.randn(3, 40, model.vision.hidden_size)
    with torch.no_grad():
        expected = theirs(features, attention_mask=torch.ones(3, 40, dtype=torch.long))
        got = model.connector(features, (5, 8))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_idefics2_export_then_import_returns_the_same_tensors(idefics2, tmp_path):
    import json

    _, model, _ = idefics2
    exported = export_hf(model, tmp_path / "hf")
    assert json.loads((exported / "config.json").read_text())["model_type"] == "idefics2"
    assert verify_hf_export(model, exported) < 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert again.config.processor == model.config.processor
    assert family_of(again) == "idefics2"


def test_idefics2_import_chat_and_export_from_the_command_line(tmp_path):
    from PIL import Image

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    save_idefics2(tmp_path / "hf", seed=3)
    Image.new("RGB", (37, 111), (200, 40, 40)).save(tmp_path / "odd.png")
    for args in (["import-hf", "hf", "ck"], ["chat", "--checkpoint", "ck", "--image", "odd.png", "What colour?", "--max-new-tokens", "3"],
                 ["export-hf", "--checkpoint", "ck", "back"]):
        out = subprocess.run([sys.executable, "-m", "vlmkit.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, f"vlmkit {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    assert (tmp_path / "back" / "model.safetensors").is_file()


def test_idefics2_training_sample_supervises_the_assistant_turn_only(idefics2, tmp_path):
    """With the image-parts template wrapper, a conversation that opens with an image encodes with
    labels on the assistant's reply alone, and its text is the family's own rendering."""
    from vlmkit.core.types import Sample

    folder, model, _ = idefics2
    path = tmp_path / "im.png"
    noise(50, 45, seed=3).save(path)
    sample = Sample("s1", [Message("user", "<image>What is it?"), Message("assistant", "A test pattern.")], images=[path])
    encoded = build_chat_processor(model, 4096).encode(sample)
    supervised = encoded.input_ids[encoded.labels != -100]
    # The reply as the template writes it after "Assistant:" (": " before a text part).
    assert model.tokenizer.decode(supervised) == " A test pattern.<end_of_utterance>\n"
    text = model.tokenizer.decode(encoded.input_ids)
    assert text.startswith("User:<fake_token_around_image>") and "\ue000" not in text and "\ue001" not in text
