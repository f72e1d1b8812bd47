"""An imported GLM-4.1V folder on a video prompt, against transformers: the frames its own
`Glm4vVideoProcessor.sample_frames` picks (`glm4v` sampling), the clip's size from its
`smart_resize` (bounds over the whole clip), pixel rows equal to its `patchify` of the
PIL-resized frames within docs/preprocessing.md's tolerance, the prompt as Glm4vProcessor writes
it (`<|begin_of_video|>`, each temporal patch an image block of `<|image|>` slots followed by the
whole seconds of its first frame, `<|end_of_video|>`), M-RoPE positions equal to
`Glm4vModel.get_rope_index`, logits within 1e-4 of Glm4vForConditionalGeneration fed
`pixel_values_videos`, and identical greedy tokens.

transformers resizes video frames with torchvision, which vlmkit never uses: the reference
frames are resized with PIL (bicubic) to the size its `smart_resize` gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _parity import check_against_transformers
from glm4v_folder import save_glm4v
from PIL import Image

from vlmkit.checkpoint import load_checkpoint
from vlmkit.data.formats import Message
from vlmkit.hf.registry import export_hf, import_hf
from vlmkit.processing import build_chat_processor
from vlmkit.processing.video import VideoInput, VideoOptions, glm4v_indices, load_clip, write_video

torch.set_num_threads(1)
PIXEL_TOLERANCE = 3 / 255
FRAMES, FPS = 12, 4  # 3 s: GLM's sampler keeps 6 frames at 2 per second
VIDEO_MIN, VIDEO_MAX = 2048, 6 * 1024  # over the whole clip: t x h x w


@pytest.fixture(scope="module")
def glm_video(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm4v_video")
    folder = save_glm4v(root / "hf", init=0.2)
    (folder / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "Glm4vVideoProcessor", "patch_size": 4, "merge_size": 2, "temporal_patch_size": 2,
        "size": {"shortest_edge": VIDEO_MIN, "longest_edge": VIDEO_MAX}, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "fps": 2}))
    model, _ = load_checkpoint(import_hf(folder, root / "vlmkit"))
    g = torch.Generator().manual_seed(0)
    frames = [Image.fromarray((torch.rand(12, 16, 3, generator=g) * 255).byte().numpy()).resize((80, 60), Image.BILINEAR)
              for _ in range(FRAMES)]
    return folder, model, write_video(root / "clip.mp4", frames, fps=FPS)


def _sampled(total: int, fps: float) -> list[int]:
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor
    from transformers.video_utils import VideoMetadata

    return Glm4vVideoProcessor(fps=2).sample_frames(VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps)).tolist()


def _reference_pixels(frames: list[Image.Image], mean, std) -> tuple[torch.Tensor, tuple[int, int, int]]:
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor, smart_resize

    w, h = frames[0].size
    rh, rw = smart_resize(len(frames), h, w, 2, 8, VIDEO_MIN, VIDEO_MAX)
    x = torch.stack([torch.from_numpy(np.asarray(f.resize((rw, rh), Image.BICUBIC), dtype=np.float32)).permute(2, 0, 1) / 255
                     for f in frames])
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    patches, t, gh, gw = Glm4vVideoProcessor.patchify(None, x[None], patch_size=4, merge_size=2, temporal_patch_size=2)
    return patches[0], (t, gh, gw)


def _reference_ids(folder, grid_thw, indices, text: str) -> tuple[list[int], list[int]]:
    """Glm4vProcessor.replace_video_token over the chat template's video part, and its
    create_mm_token_type_ids (video slots are <|image|> tokens inside the video markers)."""
    from transformers import AutoTokenizer
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    rendered = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}],
                                       tokenize=False, add_generation_prompt=True)
    vocab = tok.get_vocab()
    # The processor's own methods, on the attributes they read (its constructor needs torchvision).
    proc = type("P", (), {"video_start_id": vocab["<|begin_of_video|>"], "video_end_id": vocab["<|end_of_video|>"],
                          "image_token_id": vocab["<|image|>"], "image_token": "<|image|>"})()
    t, h, w = grid_thw
    times = [i / FPS for i in indices][::2]
    assert len(times) == t
    frames = "".join(Glm4vProcessor.replace_frame_token_id(proc, s, h * w // 4) for s in times)
    ids = tok(rendered.replace("<|video|>", frames), add_special_tokens=False)["input_ids"]
    return ids, Glm4vProcessor.create_mm_token_type_ids(proc, [ids])[0]


def test_glm4v_video_ids_positions_pixels_logits_and_greedy_match_transformers(glm_video):
    from transformers import Glm4vForConditionalGeneration

    folder, model, video = glm_video
    chat = build_chat_processor(model, 4096)
    prompt = chat.encode_prompt([Message("user", "<video>What happens?")], [VideoInput(video)])
    (group,) = prompt.images
    thw = tuple(group.views[0].grid)

    clip = load_clip(video, chat.video)
    assert clip.indices == _sampled(FRAMES, FPS) == [0, 2, 4, 6, 8, 10]
    theirs_pixels, theirs_thw = _reference_pixels(clip.frames, model.config.processor.mean, model.config.processor.std)
    assert thw == theirs_thw == (3, 6, 8)
    std = torch.tensor(model.config.processor.std).repeat_interleave(2 * 16)
    assert ((group.pixel_values - theirs_pixels).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6

    ids = prompt.input_ids[None]
    ref_ids, mm_types = _reference_ids(folder, thw, clip.indices, "What happens?")
    assert ids[0].tolist() == ref_ids
    mm_types = torch.tensor([mm_types])
    assert int((mm_types == 2).sum()) == model.count_image_tokens(group)

    ref = Glm4vForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    grid = torch.tensor([list(thw)])
    positions, _ = ref.model.get_rope_index(ids, mm_token_type_ids=mm_types, video_grid_thw=grid)
    assert torch.equal(prompt.position_ids, positions[:, 0])

    inputs = {"pixel_values_videos": group.pixel_values, "video_grid_thw": grid, "mm_token_type_ids": mm_types}
    check_against_transformers(model, ref, prompt, ids[0], inputs, positions=True)


@pytest.mark.parametrize(("total", "fps"), [(12, 4), (7, 4), (30, 30), (3, 1), (1, 25), (400 * 8, 8)])
def test_glm4v_sampler_is_transformers_sample_frames(total, fps):
    assert glm4v_indices(total, fps, VideoOptions(sampling="glm4v", fps=2)) == _sampled(total, fps)


def test_glm4v_video_settings_survive_export_and_import(glm_video, tmp_path):
    _, model, _ = glm_video
    exported = export_hf(model, tmp_path / "hf")
    settings = json.loads((exported / "video_preprocessor_config.json").read_text())
    assert settings["size"] == {"shortest_edge": VIDEO_MIN, "longest_edge": VIDEO_MAX} and settings["fps"] == 2
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    assert again.config.processor == model.config.processor
