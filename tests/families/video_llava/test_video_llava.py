"""An imported Video-LLaVA folder on video prompts, against transformers: the frames go through
the video tower (not the image tower) with their CLS token kept, their slots are the folder's
`<video>` tokens and ids and counts equal VideoLlavaProcessor's rule, each frame's pixels equal
VideoLlavaImageProcessor's on the same frame (the video processor's documented rule; it needs
torchvision) within docs/preprocessing.md's 3/255, logits within 1e-4 of
VideoLlavaForConditionalGeneration fed `pixel_values_videos`, greedy identical; an image and a
video in one prompt; export-then-import equal tensors; and the family recipe trains, answers
odd-sized images and a video, and takes LoRA on the LLM and both towers, through the command line."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from _cli import train_video_recipe_and_chat, vlmkit
from _parity import check_against_transformers, check_generated_video_token, noise
from video_llava_folder import PIXEL_TOLERANCE, STD, image_processor, reference_ids, save_video_llava

from vlmkit.checkpoint import load_checkpoint
from vlmkit.data.formats import Message
from vlmkit.families.video_llava.hf import video_llava_inputs
from vlmkit.hf.registry import export_hf, import_hf
from vlmkit.processing import build_chat_processor
from vlmkit.processing.video import VideoInput, load_clip, write_video

torch.set_num_threads(1)
FRAMES = 4


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_llava")
    folder = save_video_llava(root / "hf", num_frames=FRAMES)
    model, _ = load_checkpoint(import_hf(folder, root / "vlmkit"))
    frames = [noise(60, 44, seed=i) for i in range(6)]
    return folder, model, write_video(root / "clip.mp4", frames, fps=4)


def _reference(folder):
    from transformers import VideoLlavaForConditionalGeneration

    return VideoLlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()


def _check_against_transformers(folder, model, prompt, ids, kwargs):
    return check_against_transformers(model, _reference(folder), prompt, ids, kwargs)


def test_video_ids_pixels_logits_and_greedy_match_transformers(imported):
    folder, model, video = imported
    chat = build_chat_processor(model, 4096)
    prompt = chat.encode_prompt([Message("user", "<video>\nWhat happens?")], [VideoInput(video)])
    clip = load_clip(video, chat.video)
    assert len(clip.frames) == len(prompt.images) == FRAMES
    theirs = image_processor(folder)(images=clip.frames, return_tensors="pt", return_legacy_image_output=False)["pixel_values"]
    ours = torch.cat([g.pixel_values for g in prompt.images])
    assert ours.shape == theirs.shape == (FRAMES, 3, 32, 32)
    assert ((ours - theirs).abs() * torch.tensor(STD)[:, None, None]).max() <= PIXEL_TOLERANCE + 1e-6

    ids = reference_ids(folder, [{"type": "video"}, {"type": "text", "text": "What happens?"}], frames=ours)
    assert prompt.input_ids.tolist() == ids.tolist()
    # 32 px frames, 8 px patches: 16 patch tokens + CLS a frame.
    assert int((ids == model.video_token_id).sum()) == FRAMES * 17 == sum(model.count_image_tokens(g) for g in prompt.images)
    _check_against_transformers(folder, model, prompt, ids, video_llava_inputs(prompt))


def test_frames_read_the_video_tower(imported):
    """The video tower's weights decide the frame tokens; the image tower's do not."""
    _, model, video = imported
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<video>\nWhat?")], [VideoInput(video)])
    before = model.image_tokens(list(prompt.images))
    with torch.no_grad():
        for p in model.vision.image.parameters():
            p.add_(1.0)
        same = model.image_tokens(list(prompt.images))
        for p in model.vision.image.parameters():
            p.sub_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, same))


def test_a_generated_video_token_is_decoded_as_text_like_transformers(imported):
    """Generated tokens are never video slots: a head that prefers the video token keeps decoding
    as transformers' generate does (embedding it as an ordinary token)."""
    folder, model, video = imported
    check_generated_video_token(model, _reference(folder), video, video_llava_inputs)


def test_image_and_video_in_one_prompt_match_transformers(imported):
    folder, model, video = imported
    image = noise(50, 30, seed=7)
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>\n<video>\nSame?")], [image, VideoInput(video)])
    inputs = video_llava_inputs(prompt)
    ids = reference_ids(folder, [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Same?"}], [image],
                        frames=inputs["pixel_values_videos"][0])
    assert prompt.input_ids.tolist() == ids.tolist()
    _check_against_transformers(folder, model, prompt, ids, inputs)


def test_export_then_import_gives_equal_tensors(imported, tmp_path):
    _, model, _ = imported
    exported = export_hf(model, tmp_path / "hf")
    assert json.loads((exported / "video_preprocessor_config.json").read_text())["num_frames"] == FRAMES
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    assert again.config.processor == model.config.processor and again.config.video_token == "<video>"
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys() and any(k.startswith("vision.video.") for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_recipe_trains_answers_odd_images_and_a_video_and_takes_lora(tmp_path):
    ckpt, video = train_video_recipe_and_chat(tmp_path, "video-llava")

    # LoRA on the LLM and on both towers' attention projections.
    lora = {"model": {"init_from": str(ckpt)},
            "train": {"output_dir": "runs/lora", "max_length": 2048,
                      "stages": {"lora": {"data": "data/video.json", "trainable": ["vision", "llm"], "lr": 1e-3, "batch_size": 2,
                                          "max_steps": 2, "lora": {"parts": ["vision", "llm"], "r": 4, "alpha": 8,
                                                                   "targets": ["q_proj", "v_proj"]}}}}}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(lora))
    vlmkit(tmp_path, "train", "lora.yaml")
    trained = tmp_path / "runs" / "lora" / "checkpoints" / "lora"
    assert (trained / "adapters.safetensors").is_file()
    assert vlmkit(tmp_path, "chat", "--checkpoint", str(trained), "--video", str(video), "What?", "--max-new-tokens", "3").stdout
