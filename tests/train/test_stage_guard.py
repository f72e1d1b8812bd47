"""The stage-boundary guard: a stage that trains the vision tower or the LLM before the connector
has trained is warned about (the lecture's rule), in `vlmkit recipe --check` and at the start of
training; a connector trained long enough earlier, a starting checkpoint, `--no-guard` and
`train.stage_guard: false` silence it."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from vlmkit.config import load_config
from vlmkit.train.preflight import STAGE_GUARD_EFFECT, STAGE_GUARD_RULE, StageGuardWarning, stage_guard_warnings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import TINY_SECTIONS as TINY  # noqa: E402

# Parts with weights from files (the packaged tower and LLM): what the guard protects.
PRETRAINED = {"vision": {"name": "efficientnet-lite0"}, "llm": {"name": "smollm2-135m-instruct"},
              "processor": {"image_size": 64}, "connector": {"name": "mlp"}}


def recipe(stages: dict, model: dict | None = None, **train) -> dict:
    full = {name: {"data": "d.json", "lr": 1e-3, **s} for name, s in stages.items()}
    return {"model": model or PRETRAINED, "train": {"stages": full, **train}}


ALIGN_THEN_TOWER = {"align": {"trainable": ["connector"], "max_steps": 50},
                    "tune": {"trainable": ["vision", "connector"], "max_steps": 100}}


def test_a_tower_unfrozen_before_the_connector_converged_is_warned():
    warned = stage_guard_warnings(load_config(recipe(ALIGN_THEN_TOWER)))
    assert len(warned) == 1
    assert warned[0].startswith("stage 'tune' trains the vision tower while the connector has trained 50 step(s)")
    assert STAGE_GUARD_RULE in warned[0] and STAGE_GUARD_EFFECT in warned[0] and "--no-guard" in warned[0]
    # From the start, the tower and the LLM with a fresh connector: the first stage already.
    both = stage_guard_warnings(load_config(recipe({"all": {"trainable": ["vision", "connector", "llm"], "max_steps": 5}})))
    assert len(both) == 1 and "trains the vision tower and the LLM while the connector has trained 0 step(s)" in both[0]


def test_a_connector_trained_long_enough_earlier_is_not_warned_about():
    assert stage_guard_warnings(load_config(recipe(ALIGN_THEN_TOWER, stage_guard={"min_connector_steps": 50}))) == []
    assert stage_guard_warnings(load_config(recipe(ALIGN_THEN_TOWER), ["train.stages.align.max_steps=200"])) == []
    # Only earlier stages count, and only those that train the connector.
    frozen = {"a": {"trainable": ["llm"], "max_steps": 500}, "b": {"trainable": ["vision", "connector"], "max_steps": 500}}
    assert len(stage_guard_warnings(load_config(recipe(frozen)))) == 2
    # Connector-only recipes (the quickstart) never warn.
    from vlmkit.quickstart import default_recipe

    assert stage_guard_warnings(load_config(default_recipe())) == []


def test_parts_built_with_random_weights_have_nothing_to_protect():
    tiny = {**TINY, "connector": {"name": "mlp"}}
    assert stage_guard_warnings(load_config(recipe(ALIGN_THEN_TOWER, tiny))) == []
    # A tower that declares its weights random (built from a config), under a pretrained LLM.
    qwen2 = {**PRETRAINED, "vision": {"name": "qwen2-vit", "config": {"depth": 1, "embed_dim": 32, "num_heads": 2}}}
    assert stage_guard_warnings(load_config(recipe(ALIGN_THEN_TOWER, qwen2))) == []
    both = load_config(recipe({"all": {"trainable": ["vision", "connector", "llm"], "max_steps": 5}}, qwen2))
    assert [w.split(" while")[0] for w in stage_guard_warnings(both)] == ["stage 'all' trains the LLM"]


def test_the_key_silences_it():
    assert stage_guard_warnings(load_config(recipe(ALIGN_THEN_TOWER, stage_guard=False))) == []
    assert stage_guard_warnings(load_config(recipe(ALIGN_THEN_TOWER), ["train.stage_guard=false"])) == []
    assert len(stage_guard_warnings(load_config(recipe(ALIGN_THEN_TOWER, stage_guard=True)))) == 1
    with pytest.raises(ValueError, match="min_connector_steps"):
        load_config(recipe(ALIGN_THEN_TOWER, stage_guard={"min_connector_steps": -1}))


def test_a_model_started_from_a_trained_checkpoint_is_not_warned_about(tmp_path):
    from vlmkit.checkpoint import save_checkpoint
    from vlmkit.model.vlm import VisionLanguageModel

    config = load_config(recipe({"align": {"trainable": ["connector"], "max_steps": 1}}, {**TINY, "connector": {"name": "mlp"}}))
    model = VisionLanguageModel.build(config.model, pretrained=False)
    save_checkpoint(tmp_path / "ckpt", model, config)
    tuned = recipe({"tune": {"trainable": ["vision", "connector"], "max_steps": 5}})
    tuned["model"] = {"init_from": str(tmp_path / "ckpt")}
    assert len(stage_guard_warnings(load_config({**tuned, "model": PRETRAINED}))) == 1
    assert stage_guard_warnings(load_config(tuned)) == []


def _write(tmp_path: Path, tree: dict) -> Path:
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    record = {"id": "r0", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                              {"from": "gpt", "value": "red"}]}
    (tmp_path / "d.json").write_text(json.dumps([record] * 4))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_recipe_check_warns_and_no_guard_silences(tmp_path):
    from vlmkit.cli import app

    path = _write(tmp_path, recipe(ALIGN_THEN_TOWER))
    runner = CliRunner()
    warned = runner.invoke(app, ["recipe", "--check", str(path)])
    assert warned.exit_code == 0 and "warning: stage 'tune' trains the vision tower" in warned.output
    assert STAGE_GUARD_RULE in warned.output
    quiet = runner.invoke(app, ["recipe", "--check", str(path), "--no-guard"])
    assert quiet.exit_code == 0 and "warning" not in quiet.output and "recipe and data are valid" in quiet.output


def test_training_warns_at_the_start(tmp_path, monkeypatch):
    """The warning comes from the preflight, before any model is built."""
    from vlmkit.train import loop

    path = _write(tmp_path, recipe(ALIGN_THEN_TOWER, output_dir=str(tmp_path / "run")))

    class Built(Exception):
        pass

    def stop(*args, **kwargs):
        raise Built

    monkeypatch.setattr(loop, "_starting_model", stop)
    with pytest.warns(StageGuardWarning, match="stage 'tune' trains the vision tower"), pytest.raises(Built):
        loop.run_training(load_config(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", StageGuardWarning)
        with pytest.raises(Built):
            loop.run_training(load_config(path, ["train.stage_guard=false"]))


def test_train_no_guard_turns_the_key_off(tmp_path, monkeypatch):
    from vlmkit.cli import app
    from vlmkit.train import loop

    seen = []
    monkeypatch.setattr(loop, "run_training", lambda config, on_change: seen.append(config.train.stage_guard) or (None, []))
    path = _write(tmp_path, recipe(ALIGN_THEN_TOWER))
    for flags in ([], ["--no-guard"]):
        assert CliRunner().invoke(app, ["train", str(path), *flags]).exit_code == 0
    assert seen[0] is not False and seen[1] is False
