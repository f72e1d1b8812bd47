"""An imported LLaVA-NeXT-Video folder on video prompts, against transformers: the frames' slots
are the folder's `<video>` tokens, ids and counts equal LlavaNextVideoProcessor's rule, each
frame's pixels equal the video processor's documented rule (short side resized, long side
truncated, centre crop, normalised; run here as CLIPImageProcessorPil, the same rule on PIL,
since the video processor needs torchvision) within docs/preprocessing.md's 3/255, logits within
1e-4 of LlavaNextVideoForConditionalGeneration fed `pixel_values_videos` (average and max
pooling), greedy identical; an image and a video in one prompt; export-then-import equal
tensors; a `conv` pool refused; and the family recipe trains, answers odd-sized images and a
video, and takes LoRA, through the command line."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from _cli import train_video_recipe_and_chat, vlmkit
from _parity import check_against_transformers, check_generated_video_token, noise
from llava_next_video_folder import MEAN, PIXEL_TOLERANCE, STD, reference_ids, save_next_video

from vlmkit.checkpoint import load_checkpoint
from vlmkit.data.formats import Message
from vlmkit.families.llava_next_video.hf import next_video_inputs
from vlmkit.hf.folder import ExportError
from vlmkit.hf.registry import export_hf, import_hf
from vlmkit.processing import build_chat_processor
from vlmkit.processing.video import VideoInput, load_clip, write_video

torch.set_num_threads(1)
FRAMES = 4


@pytest.fixture(scope="module", params=["average", "max"])
def imported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"next_video_{request.param}")
    folder = save_next_video(root / "hf", mode=request.param, num_frames=FRAMES)
    model, _ = load_checkpoint(import_hf(folder, root / "vlmkit"))
    frames = [noise(60, 44, seed=i) for i in range(6)]
    return folder, model, write_video(root / "clip.mp4", frames, fps=4)


def _frames_reference(folder, frames):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    settings = json.loads((folder / "video_preprocessor_config.json").read_text())
    clip = CLIPImageProcessorPil(size=settings["size"], crop_size=settings["crop_size"], image_mean=MEAN, image_std=STD, resample=3)
    return clip(images=frames, return_tensors="pt")["pixel_values"]


def _reference(folder):
    from transformers import LlavaNextVideoForConditionalGeneration

    return LlavaNextVideoForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()


def _check_against_transformers(folder, model, prompt, ids, kwargs):
    return check_against_transformers(model, _reference(folder), prompt, ids, kwargs)


def test_video_ids_pixels_logits_and_greedy_match_transformers(imported):
    folder, model, video = imported
    assert model.config.video_token == "<video>" and model.video_token_id != model.image_token_id
    chat = build_chat_processor(model, 4096)
    prompt = chat.encode_prompt([Message("user", "<video>\nWhat happens?")], [VideoInput(video)])
    clip = load_clip(video, chat.video)
    assert len(clip.frames) == len(prompt.images) == FRAMES
    theirs = _frames_reference(folder, clip.frames)
    ours = torch.cat([g.pixel_values for g in prompt.images])
    std = torch.tensor(STD)[:, None, None]
    assert ours.shape == theirs.shape == (FRAMES, 3, 32, 32)
    assert ((ours - theirs).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6

    ids, _ = reference_ids(folder, [{"type": "video"}, {"type": "text", "text": "What happens?"}], frames=ours)
    assert prompt.input_ids.tolist() == ids.tolist()
    # 32 px frames, 8 px patches: a 4x4 map pooled 2x2 -> 4 tokens a frame.
    assert int((ids == model.video_token_id).sum()) == FRAMES * 4 == sum(model.count_image_tokens(g) for g in prompt.images)
    _check_against_transformers(folder, model, prompt, ids, next_video_inputs(prompt))


def test_a_generated_video_token_is_decoded_as_text_like_transformers(imported):
    """Generated tokens are never video slots: a head that prefers the video token keeps decoding
    as transformers' generate does (embedding it as an ordinary token)."""
    folder, model, video = imported
    check_generated_video_token(model, _reference(folder), video, next_video_inputs)


def test_image_and_video_in_one_prompt_match_transformers(imported):
    folder, model, video = imported
    image = noise(50, 30, seed=7)
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>\n<video>\nSame?")], [image, VideoInput(video)])
    inputs = next_video_inputs(prompt)
    ids, _ = reference_ids(folder, [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Same?"}], [image],
                           frames=inputs["pixel_values_videos"][0])
    assert prompt.input_ids.tolist() == ids.tolist()
    _check_against_transformers(folder, model, prompt, ids, inputs)


def test_export_then_import_gives_equal_tensors(imported, tmp_path):
    _, model, _ = imported
    exported = export_hf(model, tmp_path / "hf")
    settings = json.loads((exported / "video_preprocessor_config.json").read_text())
    assert settings["crop_size"] == {"height": 32, "width": 32} and settings["num_frames"] == FRAMES
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    assert again.config.processor == model.config.processor and again.config.video_token == "<video>"
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_conv_pooling_is_refused(tmp_path):
    folder = save_next_video(tmp_path / "hf", mode="conv")
    with pytest.raises(ExportError, match="spatial_pool_mode 'conv'"):
        import_hf(folder, tmp_path / "out")


def test_recipe_trains_answers_odd_images_and_a_video_and_takes_lora(tmp_path):
    ckpt, video = train_video_recipe_and_chat(tmp_path, "llava-next-video")

    lora = {"model": {"init_from": str(ckpt)},
            "train": {"output_dir": "runs/lora", "max_length": 2048,
                      "stages": {"lora": {"data": "data/video.json", "trainable": ["llm"], "lr": 1e-3, "batch_size": 2, "max_steps": 2,
                                          "lora": {"parts": ["llm"], "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}}}}}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(lora))
    vlmkit(tmp_path, "train", "lora.yaml")
    trained = tmp_path / "runs" / "lora" / "checkpoints" / "lora"
    assert (trained / "adapters.safetensors").is_file()
    assert vlmkit(tmp_path, "chat", "--checkpoint", str(trained), "--video", str(video), "What?", "--max-new-tokens", "3").stdout
