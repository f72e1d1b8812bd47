"""What training learned, where people look for it. `train.report_to` sends the
metrics of `metrics.jsonl` to TensorBoard (and wandb, trackio), each stage draws `loss.png` and
`heldout.png`, and a stage's result carries its held-out score."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
from _tiny import TINY_SECTIONS as MODEL
from PIL import Image

from vlmkit.config import REPORTER_NAMES, ConfigError, load_config
from vlmkit.train.loop import run_training
from vlmkit.train.reporting import REPORTERS, MetricsLog
from vlmkit.utils import read_jsonl

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from vlmkit.data.synthetic.tasks import generate

    out = tmp_path_factory.mktemp("report")
    generate(out, n_caption=4, n_instruct=16, n_test=4, seed=3)
    return out


def recipe(data_dir: Path, out: Path, **train) -> dict:
    stage = {"data": str(data_dir / "stage2.json"), "trainable": ["connector", "llm"], "lr": 3e-3, "batch_size": 4, "max_steps": 3}
    return {"model": MODEL, "train": {
        "output_dir": str(out), "report_to": ["tensorboard"],
        "eval": {"benchmark": "synth-qa", "data": str(data_dir / "test.json"), "every": 2, "max_new_tokens": 4},
        "stages": {"align": {**stage, "trainable": ["connector"]}, "sft": stage}, **train}}


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("run")
    _, results = run_training(load_config(recipe(data_dir, out)), progress=False)
    return out, results


def flatten(prefix: str, value, into: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}/{k}", v, into)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        into[prefix] = float(value)


def test_tensorboard_scalars_equal_the_jsonl_metrics(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = trained
    expected: dict[str, dict[int, float]] = {}
    for r in read_jsonl(out / "metrics.jsonl"):
        if "stage" not in r or not isinstance(r.get("step"), int):
            continue
        values: dict[str, float] = {}
        for k, v in r.items():
            if k not in ("stage", "step", "event"):
                flatten(("heldout/" if r.get("event") == "eval" else "") + k, v, values)
        for k, v in values.items():
            expected.setdefault(f"{r['stage']}/{k}", {})[r["step"]] = v
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, by_step in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got == pytest.approx(by_step, rel=1e-6, abs=1e-12), tag
    # The ones people look at first are there, per stage, at every step.
    for stage in ("align", "sft"):
        assert sorted(expected[f"{stage}/loss"]) == [1, 2, 3]
        assert f"{stage}/lr" in expected and f"{stage}/tokens_per_s" in expected
        assert sorted(expected[f"{stage}/heldout/overall"]) == [2, 3]
        assert f"{stage}/heldout/breakdown/word" in expected


def test_each_stage_draws_its_loss_and_heldout_curves(trained):
    out, results = trained
    for r in results:
        folder = out / "checkpoints" / r.name
        assert r.plots == [folder / "loss.png", folder / "heldout.png"]
        for png in r.plots:
            assert png.read_bytes()[:8] == PNG_SIGNATURE
            with Image.open(png) as image:
                image.verify()
                assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200


def test_stage_result_carries_its_last_heldout_score(trained):
    out, results = trained
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "eval"]
    for r in results:
        last = [e for e in evals if e["stage"] == r.name][-1]
        assert last["step"] == r.steps
        assert r.heldout["overall"] == last["overall"] and r.heldout["benchmark"] == "synth-qa"
        assert r.heldout["breakdown"] == last["breakdown"] and r.heldout["items"] == 4


def test_no_heldout_curve_without_train_eval(data_dir, tmp_path):
    r = recipe(data_dir, tmp_path / "run", report_to=[])
    del r["train"]["eval"]
    del r["train"]["stages"]["align"]
    _, (res,) = run_training(load_config(r), progress=False)
    assert res.plots == [tmp_path / "run" / "checkpoints" / "sft" / "loss.png"] and res.heldout is None
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_unknown_reporter_is_refused_with_the_close_match(data_dir, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(recipe(data_dir, tmp_path), ["train.report_to=[tensorbord]"])
    assert "train.report_to" in str(err.value) and "did you mean 'tensorboard'?" in str(err.value)
    assert "known: tensorboard, wandb, trackio" in str(err.value)
    # As Hugging Face's TrainingArguments take it: one name, or "none".
    assert load_config(recipe(data_dir, tmp_path), ["train.report_to=tensorboard"]).train.report_to == ["tensorboard"]
    assert load_config(recipe(data_dir, tmp_path), ["train.report_to=none"]).train.report_to == []


def test_a_reporter_not_installed_is_refused_before_training(data_dir, tmp_path):
    missing = [n for n in REPORTER_NAMES if importlib.util.find_spec(REPORTERS.get(n).module) is None]
    if not missing:
        pytest.skip("every reporting library is installed here")
    cfg = load_config(recipe(data_dir, tmp_path / "run", report_to=[missing[0]]))
    with pytest.raises(ConfigError, match=f"pip install {REPORTERS.get(missing[0]).pip}"):
        run_training(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # nothing built, nothing written


def test_every_recipe_reporter_name_is_registered():
    assert sorted(REPORTER_NAMES) == REPORTERS.names()


def _fake_wandb(monkeypatch) -> list:
    """A stand-in `wandb` module that records the calls the reporter makes."""
    calls: list = []

    class Run:
        def define_metric(self, name, step_metric=None):
            calls.append(("define_metric", name, step_metric))

        def log(self, values):
            calls.append(("log", values))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    return calls


@pytest.mark.parametrize("env_mode, mode", [(None, "offline"), ("online", "online")])
def test_wandb_runs_offline_unless_the_user_says_otherwise(monkeypatch, tmp_path, env_mode, mode):
    calls = _fake_wandb(monkeypatch)
    if env_mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env_mode)
    cfg = load_config({"train": {"output_dir": str(tmp_path / "my-run"), "report_to": ["wandb"]}})
    log = MetricsLog(tmp_path / "metrics.jsonl", cfg)
    log.log({"stage": "sft", "step": 1, "loss": 2.5, "source_shares": {"a": 0.25}})
    log.log({"stage": "sft", "step": 1, "event": "eval", "benchmark": "synth-qa", "overall": 0.5, "breakdown": {"word": 1.0}})
    log.log({"stage": "sft", "event": "source_shares", "shares": {"a": 1.0}})  # no step: the JSONL file only
    log.close()
    init = calls[0][1]
    assert init["mode"] == mode and init["name"] == "my-run" and init["dir"] == str(tmp_path / "my-run")
    assert init["config"]["train"]["report_to"] == ["wandb"]
    assert calls[1:] == [
        ("define_metric", "sft/step", None), ("define_metric", "sft/*", "sft/step"),
        ("log", {"sft/loss": 2.5, "sft/source_shares/a": 0.25, "sft/step": 1}),
        ("log", {"sft/heldout/overall": 0.5, "sft/heldout/breakdown/word": 1.0, "sft/step": 1}),
        ("finish",),
    ]
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 3
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 2.5
