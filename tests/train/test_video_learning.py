"""A tiny random VLM learns the video and multi-image tasks through the standard training path
(`run_training` on a mixed JSON file), scored by the evaluation harness (`run_benchmark` with
the vlmkit backend). Both tasks need the order and identity of token groups: a "left" clip is
a "right" clip played backwards, and swapping the two images flips the answer."""

from __future__ import annotations

import torch

from vlmkit.config import Config
from vlmkit.data.synthetic.multi_image import write_media_dataset
from vlmkit.eval.benchmarks.synth_media import SyntheticMediaBench
from vlmkit.eval.backends import VlmkitBackend
from vlmkit.eval.runner import run_benchmark
from vlmkit.train.loop import run_training

TINY = {
    # 32 px frames, 8 px patches (4x4), pooled 2x2 by the connector: 4 tokens per frame or image
    "connector": {"name": "pooling", "options": {"kernel": 2}},
    "vision": {"name": "hf-random", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "image_size": 32, "patch_size": 8}},
    "llm": {"name": "hf-random", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                            "num_attention_heads": 2, "num_key_value_heads": 1}},
    "processor": {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                  "options": {"video": {"num_frames": 4}}},
}


def test_tiny_model_learns_direction_and_more_objects(tmp_path):
    paths = write_media_dataset(tmp_path / "data", n_train=1400, n_test=80, seed=0, video_tasks=("direction", "first-shape"))
    cfg = Config.model_validate({"model": TINY, "train": {
        "output_dir": str(tmp_path / "run"), "max_length": 256,
        "stages": {"sft": {"data": str(paths["train"]), "trainable": ["vision", "connector", "llm"], "lr": 5e-3,
                           "batch_size": 16, "max_steps": 700, "warmup_ratio": 0.05}}}})
    torch.manual_seed(0)
    model, (result,) = run_training(cfg, progress=False)
    bench = SyntheticMediaBench()
    items = bench.load(paths["test"])
    outcome = run_benchmark(bench, items, VlmkitBackend(model.eval(), 256), tmp_path / "eval", model_spec="tiny",
                            batch_size=16, progress=False)
    scores = outcome.result.breakdown
    print("synthetic media scores:", scores, "final loss", result.losses[-1])
    assert scores["direction"] >= 0.6  # chance 0.25
    assert scores["first-shape"] >= 0.8  # chance 0.5 (two shapes on screen)
    assert scores["more-objects"] >= 0.8  # chance 0.5
    # Measured (seeded, CPU): direction 0.90, first-shape 1.00, more-objects 0.975. The multi-image
    # task is the fragile one at this size: with fewer pair samples or steps it stayed near 0.5-0.7.
