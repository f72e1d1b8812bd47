"""Checkpoints and logs after kills and resumes: no folder a kill left half-deleted survives the
next rotation, metrics.jsonl has one line per step, and files get the modes the umask asks for."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from _tiny import tiny_config

from vlmkit.config import load_config
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit import checkpoint as ckpt
from vlmkit.train.loop import run_training
from vlmkit.utils import JsonlLogger, atomic_write_text, read_jsonl


def tiny_model():
    torch.manual_seed(0)
    return VisionLanguageModel.build(tiny_config("mlp"), pretrained=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from vlmkit.data.synthetic.tasks import generate as generate_data

    out = tmp_path_factory.mktemp("synth")
    generate_data(out, n_caption=4, n_instruct=12, n_test=2, seed=1)
    return out


def recipe(data_dir, out, **train):
    return {
        "model": tiny_config("mlp").model_dump(mode="json"),
        "train": {"output_dir": str(out), "log_every": 1, **train,
                  "stages": {"sft": {"data": str(data_dir / "stage2.json"), "trainable": ["connector", "llm"], "lr": 3e-3,
                                     "batch_size": 4, "max_steps": 6}}},
    }


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def fake_save(path, step):
    path.mkdir()
    for name in (ckpt.CONFIG, ckpt.META, ckpt.TRAINER_STATE):
        (path / name).write_text(json.dumps({"step": step}))


def test_rotation_removes_step_folders_a_killed_prune_left_half_deleted(tmp_path):
    stage = tmp_path / "checkpoints" / "sft"
    stage.parent.mkdir(parents=True)
    # What rmtree leaves when killed after trainer_state.pt went: config and meta only.
    for step in (2, 4):
        torn = stage.with_name(f"sft-step-{step:08d}")
        torn.mkdir()
        (torn / ckpt.CONFIG).write_text("{}")
        (torn / ckpt.META).write_text(json.dumps({"step": step}))
    hidden = stage.with_name(".sft-step-00000006.pruned")  # killed during the new two-phase prune
    hidden.mkdir()
    (hidden / ckpt.META).write_text("{}")
    fake_save(stage.with_name("sft-last"), 6)

    ckpt.rotate_and_save(stage, 8, keep=2, save=lambda p: fake_save(p, 8))
    assert sorted(p.name for p in stage.parent.iterdir()) == ["sft-last", "sft-step-00000006"]
    assert ckpt.latest_resumable(stage).name == "sft-last"


def test_pruning_keeps_exactly_keep_last_complete_checkpoints(tmp_path):
    stage = tmp_path / "sft"
    for step in range(1, 6):
        ckpt.rotate_and_save(stage, step, keep=3, save=lambda p, s=step: fake_save(p, s))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft-last", "sft-step-00000003", "sft-step-00000004"]
    ckpt.remove_periodic(stage)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_files_follow_the_umask(tmp_path, umask):
    model = tiny_model()
    cfg = load_config({"model": tiny_config("mlp").model_dump(mode="json")})
    out = ckpt.save_checkpoint(tmp_path / "ck", model, cfg, {"step": 1}, {"step": 1})
    assert mode(out) == 0o755
    assert mode(out / ckpt.WEIGHTS) == 0o644 and mode(out / ckpt.TRAINER_STATE) == 0o644 and mode(out / ckpt.META) == 0o644
    assert mode(out / ckpt.TOKENIZER_DIR) == 0o755
    os.umask(0o077)  # a private umask stays private
    out = ckpt.save_checkpoint(tmp_path / "private", model, cfg)
    assert mode(out) == 0o700 and mode(out / ckpt.WEIGHTS) == 0o600


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    atomic_write_text(tmp_path / "a.json", "{}")
    assert mode(tmp_path / "a.json") == 0o644


def test_metrics_have_one_line_per_step_after_interrupted_and_resumed_runs(data_dir, tmp_path, monkeypatch):
    cfg = load_config(recipe(data_dir, tmp_path / "run", save_every=3))
    real_step = torch.optim.AdamW.step
    calls = {"n": 0, "fail_at": 0}

    def failing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", failing_step)
    # Killed at step 2, before any checkpoint: its logged step 1 will be redone.
    calls.update(n=0, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, model=tiny_model(), progress=False)
    # Killed at step 5, after the step-3 checkpoint: logged step 4 will be redone.
    calls.update(n=0, fail_at=5)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, model=tiny_model(), progress=False)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"stage": "sft", "step": 5, "lo')  # a line the kill cut short
    calls.update(n=0, fail_at=0)
    _, (result,) = run_training(cfg, model=tiny_model(), progress=False)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == pytest.approx(result.losses)


def test_jsonl_logger_drop_keeps_other_stages(tmp_path):
    logger = JsonlLogger(tmp_path / "m.jsonl")
    for stage, step in [("a", 1), ("a", 2), ("b", 1), ("b", 2)]:
        logger.log({"stage": stage, "step": step})
    assert logger.drop(lambda r: r["stage"] == "b" and r["step"] > 1) == 1
    logger.log({"stage": "b", "step": 2, "again": True})
    logger.close()
    assert read_jsonl(tmp_path / "m.jsonl") == [{"stage": "a", "step": 1}, {"stage": "a", "step": 2}, {"stage": "b", "step": 1},
                                                 {"stage": "b", "step": 2, "again": True}]
