"""SmolVLM2 (`smolvlm`) import / export against transformers on a tiny random folder: two images
in one prompt (starting with the images and with text), a video prompt, SmolVLM2's frame sampler
and number words; export back gives the same tensors and transformers' reload matches; the
`vlmkit` command imports, chats and exports it. One image (ids, pixels, logits, greedy tokens):
tests/families/test_hf_parity.py (`smolvlm_folder.PARITY`).

SmolVLM's chat template writes "User:" before a turn whose first part is an image and "User: "
otherwise. Video: SmolVLM2's video processor needs torchvision, so the reference frames are built
as images the way it builds them (its own frame sampler and prompt writer, PIL resizes; see
`smolvlm_folder.smolvlm_video_reference`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _parity import first_stop, noise
from smolvlm_folder import PIXEL_TOLERANCE, save_smolvlm, smolvlm_reference_inputs, smolvlm_video_reference

from vlmkit.checkpoint import load_checkpoint
from vlmkit.core.types import Message
from vlmkit.generate import GenerationConfig, generate
from vlmkit.hf.registry import export_hf, family_of, import_hf, verify_hf_export
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch

REPO = Path(__file__).resolve().parents[3]

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def smolvlm(tmp_path_factory):
    from transformers import SmolVLMForConditionalGeneration

    root = tmp_path_factory.mktemp("smolvlm")
    folder = save_smolvlm(root / "hf")
    model, _ = load_checkpoint(import_hf(folder, root / "vlmkit"))
    ref = SmolVLMForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    return folder, model, ref


@pytest.mark.parametrize("leading", [True, False], ids=["images-first", "text-first"])
def test_smolvlm_two_images_in_one_prompt_match_transformers(smolvlm, leading):
    folder, model, ref = smolvlm
    images = [noise(72, 40, seed=13), noise(20, 20, seed=14)]
    parts, text = [{"type": "image"}, {"type": "image"}], "<image><image>"
    content = parts + [{"type": "text", "text": "Same?"}] if leading else [{"type": "text", "text": "Same?"}] + parts
    ids, pixels = smolvlm_reference_inputs(folder, images, content)
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", text + "Same?" if leading else "Same?" + text)], images)
    assert prompt.input_ids.tolist() == ids[0].tolist()
    ours_pixels = torch.cat([im.pixel_values for im in prompt.images])[None]
    assert ours_pixels.shape == pixels.shape
    with torch.no_grad():
        ours = model(prompt.input_ids[None], visuals=VisualBatch(prompt.images)).logits
        theirs = ref(input_ids=ids, pixel_values=ours_pixels).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_smolvlm_video_prompt_matches_transformers(smolvlm, tmp_path):
    import numpy as np

    from vlmkit.processing.video import VideoInput, write_video

    folder, model, ref = smolvlm
    video = write_video(tmp_path / "clip.mp4", [np.asarray(noise(40, 24, seed=i)) for i in range(20)], fps=4)
    ids, pixels = smolvlm_video_reference(folder, video, "What happens?")
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "What happens?<video>")], [VideoInput(video)])
    assert prompt.input_ids.tolist() == ids[0].tolist()
    ours = torch.cat([im.pixel_values for im in prompt.images])
    assert ours.shape == pixels[0].shape == (6, 3, 32, 32)
    std = torch.tensor(model.config.processor.std)[:, None, None]
    assert ((ours - pixels[0]).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    with torch.no_grad():
        theirs = ref(input_ids=ids, pixel_values=ours[None]).logits
        got = model(prompt.input_ids[None], visuals=VisualBatch(prompt.images)).logits
    torch.testing.assert_close(got, theirs, atol=1e-4, rtol=0)
    expected = generate(model, [prompt], GenerationConfig(max_new_tokens=6))[0]
    out = ref.generate(input_ids=ids, pixel_values=ours[None], max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = ref.generation_config.eos_token_id
    assert first_stop(out, set(eos if isinstance(eos, list) else [eos])) == expected


def test_smolvlm_frame_sampler_and_number_words_follow_transformers():
    from types import SimpleNamespace

    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
    from transformers.video_utils import VideoMetadata

    from vlmkit.families.smolvlm.processor import number_words
    from vlmkit.processing.video import VideoOptions, sample_indices

    for total, fps, max_frames, rate in [(20, 4, 6, 2), (300, 30, 8, 1), (1000, 25, 64, 1), (7, 8, 64, 1), (90, 30, 2, 0.5)]:
        meta = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps)
        theirs = SmolVLMVideoProcessor.sample_frames(SimpleNamespace(num_frames=max_frames, fps=rate), meta).tolist()
        ours = sample_indices(total, fps, VideoOptions(sampling="smolvlm", fps=rate, max_frames=max_frames))
        assert ours == theirs, (total, fps, max_frames, rate)
    assert [number_words(n) for n in (0, 8, 13, 20, 21, 64, 100, 105, 342)] == [
        "zero", "eight", "thirteen", "twenty", "twenty-one", "sixty-four", "one hundred", "one hundred and five",
        "three hundred and forty-two"]


def test_smolvlm_export_then_import_returns_the_same_tensors(smolvlm, tmp_path):
    import json

    _, model, _ = smolvlm
    exported = export_hf(model, tmp_path / "hf")
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["model_type"] == "smolvlm" and cfg["vision_config"]["model_type"] == "smolvlm_vision"
    assert json.loads((exported / "processor_config.json").read_text())["processor_class"] == "SmolVLMProcessor"
    assert verify_hf_export(model, exported) < 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert again.config.processor == model.config.processor
    assert family_of(again) == "smolvlm"
    assert json.loads((exported / "preprocessor_config.json").read_text())["video_sampling"]["video_size"] == {"longest_edge": 48}


def test_smolvlm_import_chat_and_export_from_the_command_line(tmp_path):
    from PIL import Image

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    save_smolvlm(tmp_path / "hf", seed=3)
    Image.new("RGB", (37, 111), (200, 40, 40)).save(tmp_path / "odd.png")
    for args in (["import-hf", "hf", "ck"], ["chat", "--checkpoint", "ck", "--image", "odd.png", "What colour?", "--max-new-tokens", "3"],
                 ["export-hf", "--checkpoint", "ck", "back"]):
        out = subprocess.run([sys.executable, "-m", "vlmkit.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, f"vlmkit {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    assert (tmp_path / "back" / "model.safetensors").is_file()
