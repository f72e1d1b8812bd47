"""Video decoding (mp4 / webm / avi), sampling with timestamps, temporal compression, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmkit.processing.fixed import FixedResizeProcessor
from vlmkit.families.qwen2_vl.processor import Qwen2VLProcessor
from vlmkit.processing.video import (
    VideoLoadError, VideoOptions, load_clip, load_video, probe, sample_indices, video_layout, write_video,
)


def ramp(n=10, w=48, h=32):
    """Frame i is flat grey 20*i, so a decoded frame tells which frame it was."""
    return [np.full((h, w, 3), 20 * i, np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return {ext: write_video(d / f"ramp{ext}", ramp(), fps=5) for ext in (".mp4", ".webm", ".avi")}


@pytest.mark.parametrize("ext", [".mp4", ".webm", ".avi"])
def test_decode_uniform_sampling_with_timestamps(clips, ext):
    info = probe(clips[ext])
    assert (info.frames, info.fps, info.width, info.height) == (10, 5.0, 48, 32)
    assert info.counted == (ext == ".webm")  # WebM keeps no frame count: counted by decoding
    clip = load_clip(clips[ext], VideoOptions(num_frames=4))
    assert clip.indices == [0, 3, 6, 9]
    assert clip.timestamps == pytest.approx([0.0, 0.6, 1.2, 1.8])
    grey = [float(np.asarray(f).mean()) for f in clip.frames]
    assert grey == pytest.approx([0, 60, 120, 180], abs=3)


def test_fps_sampling_and_limits():
    # 10 frames at 5 fps = 2 s; 2 fps -> 4 frames, capped by max_frames, floored by min_frames
    assert sample_indices(10, 5.0, VideoOptions(sampling="fps", fps=2)) == [0, 3, 6, 9]
    assert sample_indices(10, 5.0, VideoOptions(sampling="fps", fps=2, max_frames=2)) == [0, 9]
    assert sample_indices(10, 5.0, VideoOptions(sampling="fps", fps=0.1, min_frames=3)) == [0, 4, 9]
    with pytest.raises(VideoLoadError, match="fewer than the 12 frames requested \\(6 fps"):
        sample_indices(10, 5.0, VideoOptions(sampling="fps", fps=6))
    with pytest.raises(VideoLoadError, match="has 10 frame\\(s\\), fewer than the 12 frames requested"):
        sample_indices(10, 5.0, VideoOptions(num_frames=12))
    with pytest.raises(VideoLoadError, match="zero frames"):
        sample_indices(0, 5.0, VideoOptions())
    with pytest.raises(ValueError, match="unknown video option"):
        VideoOptions.from_options({"frames": 3})


def test_pooling_and_temporal_patches(clips):
    fixed = FixedResizeProcessor(32, 16, fit="squash")
    pooled = load_video(fixed, clips[".mp4"], VideoOptions(num_frames=8, compression="pool", pooled_frames=2))
    assert len(pooled.groups) == 2 and pooled.layout.visual_tokens == 32
    assert pooled.layout.parts["uncompressed_tokens"] == 128
    # each group is the mean of its 4 frames (normalised pixels are affine in the raw ones)
    plain = load_video(fixed, clips[".mp4"], VideoOptions(num_frames=8))
    assert torch.allclose(pooled.groups[0].pixel_values, torch.stack([g.pixel_values for g in plain.groups[:4]]).mean(0))
    assert pooled.group_times[1] == (plain.timestamps[4], plain.timestamps[7])
    # a fixed token count whatever the length
    assert video_layout(fixed, 48, 32, 24, VideoOptions(compression="pool", pooled_frames=2)).visual_tokens == 32

    qwen = Qwen2VLProcessor(min_pixels=56 * 56, max_pixels=56 * 56)
    opts = VideoOptions(num_frames=5, compression="temporal-patch")
    v = load_video(qwen, clips[".avi"], opts)
    (g,) = v.groups
    # 48x32 -> smart_resize 84x56 -> 6x4 patches; 5 frames -> 3 temporal patches (last repeated)
    assert g.extra["video_grid_thw"] == (3, 4, 6)
    assert v.layout.visual_tokens == 3 * 4 * 6 // 4 == video_layout(qwen, 48, 32, 5, opts).visual_tokens
    assert v.grid_thw == (3, 2, 3)
    assert g.pixel_values.shape == (72, 3 * 2 * 14 * 14)
    # the two frames of a patch sit on its temporal axis: frames 0 and 2 of 10 (greys 0 and 40)
    first = g.pixel_values[0].view(3, 2, 14, 14)
    assert first[:, 1].mean() > first[:, 0].mean() + 0.3


def test_bad_videos(tmp_path, clips):
    data = clips[".avi"].read_bytes()
    (tmp_path / "junk.mp4").write_bytes(b"\x00not a video" * 50)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "half.mp4").write_bytes(clips[".mp4"].read_bytes()[:1500])
    (tmp_path / "cut.avi").write_bytes(data[: int(len(data) * 0.6)])
    for name in ("junk.mp4", "empty.mp4", "half.mp4"):
        with pytest.raises(VideoLoadError, match=name):
            load_clip(tmp_path / name, VideoOptions(num_frames=2))
    with pytest.raises(VideoLoadError, match="cut.avi.*(truncated|corrupt)"):
        load_clip(tmp_path / "cut.avi", VideoOptions(num_frames=10))
    with pytest.raises(VideoLoadError, match="not found"):
        load_clip(tmp_path / "missing.webm")
    with pytest.raises(VideoLoadError, match="48x32 = 1,536 pixels, above the limit of 1,000"):
        load_clip(clips[".webm"], VideoOptions(num_frames=2, max_frame_pixels=1000))
    with pytest.raises(VideoLoadError, match="fewer than the 11 frames"):
        load_clip(clips[".webm"], VideoOptions(num_frames=11))


def test_tokens_command_video():
    import json

    from typer.testing import CliRunner

    from vlmkit.cli import app

    run = CliRunner().invoke(app, ["tokens", "--preset", "qwen2-vl-7b", "--size", "640x360", "--frames", "16",
                                   "--compression", "temporal-patch", "--json"])
    assert run.exit_code == 0, run.output
    out = json.loads(run.output)
    # 640x360 -> 644x364 -> 46x26 patches -> 299 merged tokens per frame; 16 frames -> 8 temporal patches
    assert (out["tokens_per_frame"], out["uncompressed_tokens"], out["visual_tokens"]) == (299, 4784, 2392)
    assert out["parts"]["grid_thw"] == [8, 26, 46]
    run = CliRunner().invoke(app, ["tokens", "--preset", "llava-1.5-7b", "--size", "640x360", "--frames", "16",
                                   "--compression", "pool", "--pooled-frames", "4", "--json"])
    assert json.loads(run.output)["visual_tokens"] == 4 * 576
