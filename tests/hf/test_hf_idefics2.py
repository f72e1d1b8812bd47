"""Idefics2 (`idefics2`) import / export against transformers on tiny random folders: the same
input ids and visual-token counts as `Idefics2Processor` over `Idefics2ImageProcessorPil`
(boundary tokens shared between adjacent images, the space after an image followed by text),
pixels within docs/preprocessing.md's tolerance, logits within 1e-4 (fp32) fed transformers'
own padded pixels and masks, the same greedy tokens, with and without image splitting, two images
in one prompt; vlmkit's `perceiver` connector computes `Idefics2Connector` exactly; export back
gives the same tensors and transformers' reload matches; the `vlmkit` command imports, chats
and exports it.

Idefics2's template writes "User:" before a turn whose first part is an image and "User: "
otherwise; the prompts here start with text or with the images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmkit.data.formats import Message
from vlmkit.generate import GenerationConfig, generate
from vlmkit.hf.families.idefics2 import idefics2_inputs
from vlmkit.hf.registry import export_hf, family_of, import_hf, verify_hf_export
from vlmkit.processing import build_chat_processor
from vlmkit.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _hf_folders_idefics2 import idefics2_processor, save_idefics2  # noqa: E402
from test_hf_import import PIXEL_TOLERANCE, _assert_same_tensors, _first_stop, noise  # noqa: E402

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


def _check(folder, model, ref, images, greedy: bool = True, leading: bool = False):
    hf_proc = idefics2_processor(folder)
    before = [] if leading else [{"type": "text", "text": "What is shown?"}]
    content = before + [{"type": "image"} for _ in images] + [{"type": "text", "text": "Answer."}]
    text = hf_proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    hf_inputs = hf_proc(images=[images], text=text, return_tensors="pt")
    ours = ("" if leading else "What is shown?") + "<image>" * len(images) + "Answer."
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", ours)], images)
    assert prompt.input_ids.tolist() == hf_inputs["input_ids"][0].tolist()
    assert sum(model.count_image_tokens(im) for im in prompt.images) == int((hf_inputs["input_ids"] == model.image_token_id).sum())
    ours_inputs = idefics2_inputs(prompt.images)
    std = torch.tensor(model.config.processor.std)[:, None, None]
    views = [v for im in prompt.images for v in im.views]
    assert len(views) == hf_inputs["pixel_values"].shape[1]
    for i, v in enumerate(views):  # transformers' view, cut to the whole patches the model reads
        theirs = hf_inputs["pixel_values"][0, i, :, : v.size[0], : v.size[1]]
        assert ((ours_inputs["pixel_values"][0, i, :, : v.size[0], : v.size[1]] - theirs).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    with torch.no_grad():
        ours = model(prompt.input_ids[None], images=prompt.images).logits
        theirs = ref(**hf_inputs).logits  # transformers' own pixels, padding and masks
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    if greedy:
        expected = generate(model, [prompt], GenerationConfig(max_new_tokens=8))[0]
        out = ref.generate(**hf_inputs, max_new_tokens=8, do_sample=False)[0, prompt.input_ids.shape[0]:].tolist()
        eos = ref.generation_config.eos_token_id
        assert _first_stop(out, set(eos if isinstance(eos, list) else [eos])) == expected


# (20, 20): raised to the shortest edge; (72, 40), (24, 90): longest edge cut, sides not whole
# patches; (100, 100): down to the longest edge; (50, 45): kept as is.
@pytest.mark.parametrize("size", [(20, 20), (72, 40), (24, 90), (100, 100), (50, 45)])
def test_idefics2_import_ids_pixels_logits_and_greedy_match_transformers(idefics2, size):
    folder, model, ref = idefics2
    assert family_of(model) == "idefics2"
    _check(folder, model, ref, [noise(*size, seed=5)], leading=size[0] % 2 == 0)


@pytest.mark.parametrize("size", [(72, 40), (50, 45)])
def test_idefics2_split_images_match_transformers(idefics2_split, size):
    _check(*idefics2_split, [noise(*size, seed=6)])


def test_idefics2_two_images_in_one_prompt_match_transformers(idefics2, idefics2_split):
    images = [noise(72, 40, seed=11), noise(30, 80, seed=12)]
    _check(*idefics2, images)
    _check(*idefics2, images, greedy=False, leading=True)
    _check(*idefics2_split, images, greedy=False)


def test_perceiver_connector_is_idefics2_connector(idefics2):
    """vlmkit's perceiver (as the import configures it) and transformers' Idefics2Connector give
    the same latents from the same weights."""
    from transformers import Idefics2Config
    from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector

    from vlmkit.hf.families.idefics2 import their_connector_key

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
    _assert_same_tensors(model, again)
    assert again.config.processor == model.config.processor
    assert family_of(again) == "idefics2"


def test_idefics2_import_chat_and_export_from_the_command_line(tmp_path):
    from PIL import Image

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repo / "src"), os.environ.get("PYTHONPATH", "")])}
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
    from vlmkit.data.formats import Sample

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
