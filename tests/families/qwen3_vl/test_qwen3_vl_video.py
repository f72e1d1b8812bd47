"""An imported Qwen3-VL folder on a video prompt, against transformers: every temporal patch is
its own `<|vision_start|> ... <|vision_end|>` block after its time as text (Qwen3VLProcessor's
rule, with its own `_calculate_timestamps`), the M-RoPE positions equal
`Qwen3VLModel.get_rope_index` (one block per frame), the clip's size follows
Qwen3VLVideoProcessor's `smart_resize` (bounds over the whole clip), the pixel rows equal its
`patchify` of the PIL-resized frames within docs/preprocessing.md's tolerance, logits within
1e-4 of Qwen3VLForConditionalGeneration fed `pixel_values_videos`, greedy identical.

transformers' video processor needs torchvision for its resize, which vlmkit never uses: the
reference frames are resized with PIL (bicubic) to the size its `smart_resize` gives, then
normalised and laid out by its own `patchify`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _parity import check_against_transformers
from PIL import Image
from qwen2_vl_folder import check_image_and_video_prompt
from qwen3_vl_folder import save_qwen3vl

from vlmkit.checkpoint import load_checkpoint
from vlmkit.data.formats import Message
from vlmkit.families.qwen3_vl.processor import frame_times, video_smart_resize
from vlmkit.hf.registry import export_hf, import_hf
from vlmkit.processing import build_chat_processor
from vlmkit.processing.video import VideoInput, load_clip, write_video

torch.set_num_threads(1)
PIXEL_TOLERANCE = 3 / 255
FRAMES = 5  # odd: the last temporal patch repeats the last frame
FPS = 4
VIDEO_MIN, VIDEO_MAX = 2048, 4 * 1024  # over the whole clip: t x h x w


@pytest.fixture(scope="module")
def qwen3_video(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3vl_video")
    folder = save_qwen3vl(root / "hf", init=0.2)
    (folder / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "Qwen3VLVideoProcessor", "patch_size": 4, "merge_size": 2, "temporal_patch_size": 2,
        "size": {"shortest_edge": VIDEO_MIN, "longest_edge": VIDEO_MAX}, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "resample": 3, "do_sample_frames": True, "num_frames": FRAMES}))
    model, _ = load_checkpoint(import_hf(folder, root / "vlmkit"))
    g = torch.Generator().manual_seed(0)
    frames = [Image.fromarray((torch.rand(12, 16, 3, generator=g) * 255).byte().numpy()).resize((80, 60), Image.BILINEAR)
              for _ in range(FRAMES)]
    return folder, model, write_video(root / "clip.mp4", frames, fps=FPS)


def _reference_pixels(frames: list[Image.Image], mean, std) -> tuple[torch.Tensor, tuple[int, int, int]]:
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize

    w, h = frames[0].size
    rh, rw = smart_resize(len(frames), h, w, 2, 8, VIDEO_MIN, VIDEO_MAX)
    x = torch.stack([torch.from_numpy(np.asarray(f.resize((rw, rh), Image.BICUBIC), dtype=np.float32)).permute(2, 0, 1) / 255
                     for f in frames])
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    patches, t, gh, gw = Qwen3VLVideoProcessor.patchify(None, x[None], patch_size=4, merge_size=2, temporal_patch_size=2)
    return patches[0], (t, gh, gw)


def _reference_ids(folder, grid_thw, text: str) -> list[int]:
    """Qwen3VLProcessor.replace_video_token: the chat template's wrapped video becomes one block per
    temporal patch, each after `<t seconds>`."""
    from transformers import AutoTokenizer
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    rendered = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}],
                                       tokenize=False, add_generation_prompt=True)
    t, h, w = grid_thw
    times = Qwen3VLProcessor._calculate_timestamps(None, list(range(FRAMES)), FPS, 2)
    frames = "".join(f"<{s:.1f} seconds><|vision_start|>" + "<|video_pad|>" * (h * w // 4) + "<|vision_end|>" for s in times)
    assert len(times) == t
    rendered = rendered.replace("<|vision_start|><|video_pad|><|vision_end|>", frames)
    return tok(rendered, add_special_tokens=False)["input_ids"]


def test_qwen3vl_video_ids_positions_pixels_logits_and_greedy_match_transformers(qwen3_video):
    from transformers import Qwen3VLForConditionalGeneration

    folder, model, video = qwen3_video
    chat = build_chat_processor(model, 4096)
    prompt = chat.encode_prompt([Message("user", "<video>What happens?")], [VideoInput(video)])
    (group,) = prompt.images
    thw = tuple(group.views[0].grid)

    clip = load_clip(video, chat.video)
    assert len(clip.frames) == FRAMES
    theirs_pixels, theirs_thw = _reference_pixels(clip.frames, model.config.processor.mean, model.config.processor.std)
    assert thw == theirs_thw == (3, 6, 8)  # 60x80 -> 24x32: 6 x 24 x 32 = 4608 > 4096 pixels shrinks the clip
    std = torch.tensor(model.config.processor.std).repeat_interleave(2 * 16)
    assert ((group.pixel_values - theirs_pixels).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6

    ids = prompt.input_ids[None]
    assert ids[0].tolist() == _reference_ids(folder, thw, "What happens?")
    video_id = model.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((ids == video_id).sum()) == model.count_image_tokens(group)

    ref = Qwen3VLForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    grid = torch.tensor([list(thw)])
    mm_types = (ids == video_id).int() * 2  # image == 1, video == 2
    positions, _ = ref.model.get_rope_index(ids, mm_token_type_ids=mm_types, video_grid_thw=grid)
    assert torch.equal(prompt.position_ids, positions[:, 0])

    inputs = {"pixel_values_videos": group.pixel_values, "video_grid_thw": grid, "mm_token_type_ids": mm_types}
    check_against_transformers(model, ref, prompt, ids[0], inputs, positions=True)


def test_qwen3vl_video_and_image_in_one_prompt_match_transformers(qwen3_video):
    """DeepStack levels of an image and a video in one prompt go to their own slots."""
    from transformers import Qwen3VLForConditionalGeneration

    folder, model, video = qwen3_video
    ref = Qwen3VLForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    check_image_and_video_prompt(model, ref, video)


def test_qwen3vl_video_settings_survive_export_and_import(qwen3_video, tmp_path):
    _, model, _ = qwen3_video
    exported = export_hf(model, tmp_path / "hf")
    settings = json.loads((exported / "video_preprocessor_config.json").read_text())
    assert settings["video_processor_type"] == "Qwen3VLVideoProcessor"
    assert settings["size"] == {"shortest_edge": VIDEO_MIN, "longest_edge": VIDEO_MAX} and settings["num_frames"] == FRAMES
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    assert again.config.processor == model.config.processor and again.config.video_token == "<|video_pad|>"


@pytest.mark.parametrize(("frames", "height", "width"), [(5, 60, 80), (2, 20, 300), (64, 720, 1280), (3, 1000, 7), (9, 33, 33)])
def test_video_smart_resize_is_transformers_rule(frames, height, width):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    want = smart_resize(frames, height, width, 2, 32, 128 * 32 * 32, 768 * 32 * 32)
    assert video_smart_resize(frames, height, width, 2, 32, 128 * 32 * 32, 768 * 32 * 32) == want


def test_frame_times_match_qwen3vl_processor():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    for n, fps in [(5, 4), (8, 2.0), (1, 24)]:
        indices = list(range(0, 3 * n, 3))
        assert frame_times([i / fps for i in indices]) == pytest.approx(Qwen3VLProcessor._calculate_timestamps(None, indices, fps, 2))


@pytest.mark.parametrize(("total", "fps"), [(12, 4), (9, 4), (300, 30), (100, 24), (5000, 25)])
def test_qwen3vl_import_samples_frames_as_its_video_processor(total, fps):
    """A folder silent on sampling gets Qwen3VLVideoProcessor's default (2 frames per second, 4 to
    768 frames); vlmkit's `fps` sampler picks the frames its `sample_frames` picks. (Where 2 per
    second asks for more frames than the video has, below 2 fps or under `min_frames` frames,
    vlmkit refuses the video; transformers takes every frame.)"""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    from vlmkit.families.qwen3_vl.hf import _qwen3_vl_video
    from vlmkit.processing.video import VideoOptions, sample_indices

    class Tok:
        def convert_ids_to_tokens(self, i):
            return "<|video_pad|>"

        def get_vocab(self):
            return {"<|video_pad|>": 7}

    cfg = type("C", (), {"video_token_id": 7})()
    _, options = _qwen3_vl_video(Path("/nonexistent"), cfg, Tok(), {})
    ours = sample_indices(total, fps, VideoOptions(**options["video"]))
    theirs = Qwen3VLVideoProcessor().sample_frames(VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps))
    assert ours == theirs.tolist()
