"""An imported Qwen2-VL folder on a video prompt, against transformers: the video's slots are
the folder's <|video_pad|> tokens, the ids and M-RoPE positions equal what Qwen2VLProcessor's
rule and `get_rope_index(video_grid_thw=...)` give, the frames' pixel rows equal the documented
rule of Qwen2VLVideoProcessor (its own smart_resize bounds, frames padded to the temporal patch
by repeating the last, patches flattened as (t, h/m, w/m, m, m, C, tp, p, p)) within
docs/preprocessing.md's tolerance, logits within 1e-4 of Qwen2VLForConditionalGeneration fed
`pixel_values_videos`, greedy identical, and the export keeps the video settings.

transformers' video processor needs torchvision, which vlmkit never uses: the reference pixels
are Qwen2VLImageProcessorPil's frames (each frame resized as the video processor resizes it)
assembled by the video processor's documented patch layout. The processor's own video patches
(`Qwen2VLProcessor.video_pixels`) follow that layout exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _parity import check_against_transformers
from PIL import Image
from qwen2_vl_folder import check_image_and_video_prompt, save_qwen2vl

from vlmkit.checkpoint import load_checkpoint
from vlmkit.data.formats import Message
from vlmkit.families.qwen2_vl.processor import Qwen2VLProcessor
from vlmkit.hf.registry import export_hf, import_hf
from vlmkit.processing import build_chat_processor
from vlmkit.processing.images import Resizer, normalize_
from vlmkit.processing.video import VideoInput, load_clip, write_video

torch.set_num_threads(1)
PIXEL_TOLERANCE = 3 / 255
FRAMES = 5  # odd: the last temporal patch repeats the last frame
VIDEO_MIN, VIDEO_MAX = 1024, 2048  # the video processor's own bounds (the images' are 256 .. 16384)


@pytest.fixture(scope="module")
def qwen_video(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2vl_video")
    folder = save_qwen2vl(root / "hf")
    (folder / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 4, "merge_size": 2, "temporal_patch_size": 2,
        "size": {"shortest_edge": VIDEO_MIN, "longest_edge": VIDEO_MAX}, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "do_sample_frames": True, "num_frames": FRAMES}))
    model, _ = load_checkpoint(import_hf(folder, root / "vlmkit"))
    g = torch.Generator().manual_seed(0)
    frames = [Image.fromarray((torch.rand(12, 16, 3, generator=g) * 255).byte().numpy()).resize((80, 60), Image.BILINEAR)
              for _ in range(FRAMES)]
    video = write_video(root / "clip.mp4", frames, fps=4)
    return folder, model, video


def _reference_pixels(folder, frames: list[Image.Image]) -> tuple[torch.Tensor, tuple[int, int, int]]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil.from_pretrained(folder, local_files_only=True)
    p, m, tp = 4, 2, 2
    # Each frame as the video processor resizes it: smart_resize with the video's bounds.
    rows, grid = [], None
    for frame in frames:
        out = ip(images=[frame], size={"shortest_edge": VIDEO_MIN, "longest_edge": VIDEO_MAX}, return_tensors="pt")
        grid = out["image_grid_thw"][0].tolist()
        # An image's patch row is (C, tp, p, p) with the frame in every temporal slot.
        rows.append(out["pixel_values"].view(-1, 3, tp, p * p)[:, :, 0])
    while len(rows) % tp:
        rows.append(rows[-1])  # pad: the last frame repeated
    t = len(rows) // tp
    n = rows[0].shape[0]  # patches per frame, already in (h/m, w/m, m, m) order
    stacked = torch.stack(rows).view(t, tp, n, 3, p * p).permute(0, 2, 3, 1, 4)  # (t, n, C, tp, p*p)
    return stacked.reshape(t * n, 3 * tp * p * p), (t, grid[1], grid[2])


def _reference_ids(folder, grid_thw, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    rendered = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}],
                                       tokenize=False, add_generation_prompt=True)
    # Qwen2VLProcessor.replace_video_token: grid_thw.prod() // merge_size**2 video tokens.
    rendered = rendered.replace("<|video_pad|>", "<|video_pad|>" * (int(np.prod(grid_thw)) // 4))
    return tok(rendered, add_special_tokens=False)["input_ids"]


def test_qwen2vl_video_ids_positions_pixels_logits_and_greedy_match_transformers(qwen_video):
    from transformers import Qwen2VLForConditionalGeneration

    folder, model, video = qwen_video
    assert model.config.video_token == "<|video_pad|>"
    chat = build_chat_processor(model, 4096)
    prompt = chat.encode_prompt([Message("user", "<video>What happens?")], [VideoInput(video)])
    (group,) = prompt.images
    thw = tuple(group.views[0].grid)

    clip = load_clip(video, chat.video)
    assert len(clip.frames) == FRAMES and clip.indices == list(range(FRAMES))
    theirs_pixels, theirs_thw = _reference_pixels(folder, clip.frames)
    assert thw == theirs_thw == (3, 8, 12)  # 60x80 -> 32x48 under the video bounds (the image bounds give 64x80)
    std = torch.tensor(model.config.processor.std).repeat_interleave(2 * 16)
    assert group.pixel_values.shape == theirs_pixels.shape
    assert ((group.pixel_values - theirs_pixels).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6

    ids = prompt.input_ids[None]
    assert ids[0].tolist() == _reference_ids(folder, thw, "What happens?")
    video_id = model.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((ids == video_id).sum()) == model.count_image_tokens(group) and not (ids == model.image_token_id).any()

    ref = Qwen2VLForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    grid = torch.tensor([list(thw)])
    mm_types = (ids == video_id).int() * 2  # image == 1, video == 2
    positions, _ = ref.model.get_rope_index(ids, mm_token_type_ids=mm_types, video_grid_thw=grid)
    assert torch.equal(prompt.position_ids, positions[:, 0])

    inputs = {"pixel_values_videos": group.pixel_values, "video_grid_thw": grid, "mm_token_type_ids": mm_types}
    check_against_transformers(model, ref, prompt, ids[0], inputs, positions=True)


def test_qwen2vl_video_and_image_in_one_prompt_match_transformers(qwen_video):
    from transformers import Qwen2VLForConditionalGeneration

    folder, model, video = qwen_video
    ref = Qwen2VLForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    check_image_and_video_prompt(model, ref, video)


def test_qwen2vl_video_settings_survive_export_and_import(qwen_video, tmp_path):
    _, model, _ = qwen_video
    exported = export_hf(model, tmp_path / "hf")
    settings = json.loads((exported / "video_preprocessor_config.json").read_text())
    assert settings["size"] == {"shortest_edge": VIDEO_MIN, "longest_edge": VIDEO_MAX} and settings["num_frames"] == FRAMES
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    assert again.config.processor == model.config.processor
    assert again.config.video_token == "<|video_pad|>"


def test_qwen2vl_video_patches_follow_the_reference_layout():
    """Frames normalised and laid out exactly as transformers' Qwen2-VL flattens a video:
    (t, tp, C, gh/m, m, p, gw/m, m, p) -> (t, gh/m, gw/m, m, m, C, tp, p, p), last frame repeated."""
    rng = np.random.default_rng(4)
    frames = [Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)) for _ in range(5)]
    qwen = Qwen2VLProcessor(min_pixels=56 * 56, max_pixels=200 * 200)
    got, (t, gh, gw) = qwen.video_pixels(frames)
    rh, rw = qwen.resized_size(100, 70)
    p, m, tp = 14, 2, 2
    x = torch.stack([normalize_(Resizer(f).resize(rh, rw).float(), qwen.mean, qwen.std) for f in frames + frames[-1:]])
    want = x.view(t, tp, 3, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    assert (t, gh, gw) == (3, rh // p, rw // p) and gh > 2 and gw > 2
    assert torch.equal(got, want.reshape(t * gh * gw, 3 * tp * p * p))
