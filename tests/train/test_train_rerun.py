"""Re-running a recipe: a changed stage is refused (or restarted / extended on request), the
data is checked before the model loads on every run, relative data paths follow the recipe file,
and `model.init_from` starts a new recipe from another run's checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests._tiny import tiny_config
from vlmkit.config import ConfigError, load_config
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit import checkpoint as ckpt
from vlmkit.train.loop import run_training
from vlmkit.train.preflight import DataError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from vlmkit.data.synthetic.tasks import generate as generate_data

    out = tmp_path_factory.mktemp("synth")
    generate_data(out, n_caption=8, n_instruct=12, n_test=2, seed=3)
    return out


def tiny_model(seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    return VisionLanguageModel.build(tiny_config("mlp"), pretrained=False)


def recipe(data_dir: Path, out: Path, two_stages: bool = False, **instruct) -> dict:
    stages = {}
    if two_stages:
        stages["align"] = {"data": str(data_dir / "stage1.json"), "trainable": ["connector"], "lr": 3e-3, "batch_size": 4, "max_steps": 2}
    stages["instruct"] = {"data": str(data_dir / "stage2.json"), "trainable": ["connector", "llm"], "lr": 3e-3, "batch_size": 4,
                          "max_steps": 3, **instruct}
    return {"model": tiny_config("mlp").model_dump(mode="json"), "train": {"output_dir": str(out), "stages": stages}}


def train(tree: dict, **kw):
    return run_training(load_config(tree), model=tiny_model(), progress=False, **kw)[1]


# ---- bug 1: a changed stage is never "0 steps, loss nan" ----------------------------------------

def test_changed_stage_setting_is_refused_with_the_changed_key(data_dir, tmp_path):
    train(recipe(data_dir, tmp_path / "run"))
    again = train(recipe(data_dir, tmp_path / "run"))
    assert again[0].loaded and again[0].steps == 0
    with pytest.raises(ckpt.ResumeMismatchError) as err:
        train(recipe(data_dir, tmp_path / "run", max_steps=5, lr=1e-3))
    message = str(err.value)
    assert "stage 'instruct' is already trained" in message
    assert "train.stages.instruct.max_steps: checkpoint 3, now 5" in message
    assert "train.stages.instruct.lr: checkpoint 0.003, now 0.001" in message
    assert "--restart" in message and "--extend" in message


def test_changed_data_contents_are_refused(data_dir, tmp_path):
    data = tmp_path / "mine.json"
    records = json.loads((data_dir / "stage2.json").read_text())
    for r in records:
        r["image"] = str(data_dir / r["image"])
    data.write_text(json.dumps(records[:8]))
    train(recipe(data_dir, tmp_path / "run", data=str(data)))
    data.write_text(json.dumps(records[4:]))  # same path, other records
    with pytest.raises(ckpt.ResumeMismatchError, match=r"train\.stages\.instruct\.data: not the data the checkpoint was trained on"):
        train(recipe(data_dir, tmp_path / "run", data=str(data)))


def test_restart_trains_again_and_extend_continues_from_the_trained_weights(data_dir, tmp_path):
    first = train(recipe(data_dir, tmp_path / "run", max_steps=6, lr=1e-2))
    restarted = train(recipe(data_dir, tmp_path / "run", max_steps=4, lr=1e-2), on_change="restart")
    assert restarted[0].steps == 4 and not restarted[0].loaded
    # From the start: the same first step as the first run.
    assert restarted[0].losses[0] == pytest.approx(first[0].losses[0], rel=1e-5)
    assert ckpt.read_meta(tmp_path / "run" / "checkpoints" / "instruct")["step"] == 4
    assert train(recipe(data_dir, tmp_path / "run", max_steps=4, lr=1e-2))[0].loaded

    extended = train(recipe(data_dir, tmp_path / "run", max_steps=5, lr=1e-2), on_change="extend")
    assert extended[0].extended and extended[0].steps == 5
    # It starts where the trained stage ended, so its first loss is the trained model's.
    assert extended[0].losses[0] < first[0].losses[0] * 0.9


def test_later_stages_are_trained_again_after_an_earlier_one_changes(data_dir, tmp_path):
    train(recipe(data_dir, tmp_path / "run", two_stages=True))
    changed = recipe(data_dir, tmp_path / "run", two_stages=True)
    changed["train"]["stages"]["align"]["lr"] = 1e-3
    with pytest.raises(ckpt.ResumeMismatchError, match=r"stage 'align'.*\n.*train\.stages\.align\.lr"):
        train(changed)
    results = train(changed, on_change="restart")
    # instruct itself did not change, but it was trained on top of the old align.
    assert [r.steps for r in results] == [2, 3]
    assert [r.loaded for r in train(changed)] == [True, True]


def test_data_is_checked_again_after_a_checkpoint_exists(data_dir, tmp_path):
    data = tmp_path / "mine.json"
    records = json.loads((data_dir / "stage2.json").read_text())
    for r in records:
        r["image"] = str(data_dir / r["image"])
    data.write_text(json.dumps(records))
    train(recipe(data_dir, tmp_path / "run", data=str(data)))
    data.write_text(json.dumps(records)[:-5])
    with pytest.raises(DataError, match=r"stage 'instruct': .*mine\.json: not valid JSON"):
        train(recipe(data_dir, tmp_path / "run", data=str(data)))


def test_data_errors_come_before_the_model_is_built(data_dir, tmp_path, monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(VisionLanguageModel, "build", no_build)
    records = json.loads((data_dir / "stage2.json").read_text())
    for r in records:
        r["image"] = str(data_dir / r["image"])
    records[1]["image"] = str(tmp_path / "gone.png")
    records[3]["conversations"] = []
    data = tmp_path / "mine.json"
    data.write_text(json.dumps(records))
    with pytest.raises(DataError) as err:
        run_training(load_config(recipe(data_dir, tmp_path / "run", data=str(data))), progress=False)
    message = str(err.value)
    assert "2 unusable record(s)" in message
    assert f"record {records[1]['id']!r}: {tmp_path / 'gone.png'}" in message
    assert f"record {records[3]['id']!r}: missing or empty 'conversations'" in message


# ---- bug 2: relative data paths follow the recipe file --------------------------------------------

def test_relative_data_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    path = folder / "my.yaml"
    path.write_text(yaml.safe_dump({"train": {"stages": {"sft": {"data": "data/train.json", "trainable": ["connector"], "lr": 1e-3}}}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(path).train.stages["sft"].data == str(folder / "data" / "train.json")
    # Given on the command line, a path is the shell's: relative to the working directory.
    assert load_config(path, ["train.stages.sft.data=cli.json"]).train.stages["sft"].data == str(elsewhere / "cli.json")
    # An explicit data_dir wins for every relative data path.
    cfg = load_config(path, [f"train.data_dir={tmp_path / 'store'}"])
    assert cfg.train.stages["sft"].data == str(tmp_path / "store" / "data" / "train.json")
    assert load_config(path, ["train.data_dir=store"]).train.stages["sft"].data == str(elsewhere / "store" / "data" / "train.json")
    # Written in the recipe, data_dir is relative to the recipe's folder like any path there.
    tree = yaml.safe_load(path.read_text())
    tree["train"]["data_dir"] = "store"
    path.write_text(yaml.safe_dump(tree))
    assert load_config(path).train.stages["sft"].data == str(folder / "store" / "data" / "train.json")


def test_missing_data_names_the_stage_and_absolute_path(tmp_path, monkeypatch):
    from vlmkit.quickstart import default_recipe

    monkeypatch.chdir(tmp_path)
    cfg = load_config(default_recipe())
    expected = Path(default_recipe()).parent / "stage2.json"
    with pytest.raises(DataError, match=f"stage 'embed': data file not found: {expected}"):
        run_training(cfg, progress=False)


def test_unknown_keys_suggest_the_close_match(tmp_path):
    tree = {"train": {"stages": {"sft": {"data": "x.json", "trainable": ["connector"], "lr": 1e-3, "max_step": 3}}}}
    with pytest.raises(ConfigError, match=r"train\.stages\.sft\.max_step: unknown key; did you mean 'max_steps'\?"):
        load_config(tree)
    with pytest.raises(ConfigError, match=r"model\.conector: unknown key; did you mean 'connector'\?"):
        load_config({"model": {"conector": {}}})


# ---- model.init_from ----------------------------------------------------------------------------

def test_init_from_starts_a_new_recipe_from_another_runs_checkpoint(data_dir, tmp_path):
    base = recipe(data_dir, tmp_path / "base", max_steps=4, lr=1e-2)
    base_model, _ = run_training(load_config(base), model=tiny_model(), progress=False)
    source = tmp_path / "base" / "checkpoints" / "instruct"

    # The model section is only `init_from`: everything else comes from the checkpoint.
    tuned = {"model": {"init_from": str(source)},
             "train": {"output_dir": str(tmp_path / "tuned"), "stages": {
                 "mine": {"data": str(data_dir / "stage2.json"), "trainable": ["connector"], "lr": 1e-9, "max_steps": 1, "batch_size": 4}}}}
    cfg = load_config(tuned)
    assert cfg.model.llm.config == base["model"]["llm"]["config"] and cfg.model.init_from == str(source)
    model, results = run_training(cfg, progress=False)
    assert results[0].steps == 1
    for name in ("vision", "llm"):
        for a, b in zip(base_model.parts()[name].parameters(), model.parts()[name].parameters()):
            assert torch.equal(a.cpu(), b.cpu()), name

    # The new checkpoint holds everything it started from: loadable with the source gone.
    import shutil

    shutil.rmtree(tmp_path / "base")
    loaded, _ = ckpt.load_checkpoint(tmp_path / "tuned" / "checkpoints" / "mine")
    for a, b in zip(model.llm.parameters(), loaded.llm.parameters()):
        assert torch.equal(a.cpu(), b.cpu())


def test_init_from_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="model.init_from.*is not a vlmkit checkpoint"):
        load_config({"model": {"init_from": str(tmp_path)}})


def test_a_refusal_comes_before_the_model_is_built(data_dir, tmp_path, monkeypatch):
    train(recipe(data_dir, tmp_path / "run"))

    def no_build(*a, **k):
        raise AssertionError("the model was built before the checkpoints were compared")

    monkeypatch.setattr(VisionLanguageModel, "build", no_build)
    with pytest.raises(ckpt.ResumeMismatchError, match=r"train\.stages\.instruct\.max_steps"):
        run_training(load_config(recipe(data_dir, tmp_path / "run", max_steps=4)), progress=False)


def test_init_from_with_a_model_that_does_not_fit_the_checkpoint(data_dir, tmp_path):
    run_training(load_config(recipe(data_dir, tmp_path / "base")), model=tiny_model(), progress=False)
    source = tmp_path / "base" / "checkpoints" / "instruct"
    tree = {"model": {"init_from": str(source), "llm": {"config": {**tiny_config("mlp").llm.config, "hidden_size": 64}}},
            "train": {"output_dir": str(tmp_path / "tuned"), "stages": {
                "mine": {"data": str(data_dir / "stage2.json"), "trainable": ["connector"], "lr": 1e-3, "max_steps": 1}}}}
    with pytest.raises(ConfigError, match=r"model.init_from: the checkpoint's weights do not fit the model this recipe builds \(size mismatch for fc1.weight"):
        run_training(load_config(tree), progress=False)


def test_model_names_and_connector_options_are_checked_before_anything_loads(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(VisionLanguageModel, "build", lambda *a, **k: pytest.fail("the model was built"))
    tree = recipe(data_dir, tmp_path / "run")
    tree["model"]["connector"] = {"name": "mlp", "options": {"input_nrom": True}}
    with pytest.raises(ConfigError, match=r"model\.connector\.options\.input_nrom: unknown option; did you mean 'input_norm'\?"):
        run_training(load_config(tree), progress=False)
    tree["model"]["connector"] = {"name": "qfromer"}
    with pytest.raises(ConfigError, match=r"model\.connector\.name: unknown connector 'qfromer'; did you mean 'qformer'\?"):
        run_training(load_config(tree), progress=False)


def test_extend_refuses_a_changed_model_before_building_it(data_dir, tmp_path, monkeypatch):
    train(recipe(data_dir, tmp_path / "run"))
    changed = recipe(data_dir, tmp_path / "run")
    changed["model"]["connector"]["name"] = "linear"
    monkeypatch.setattr(VisionLanguageModel, "build", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(ckpt.ResumeMismatchError, match=r"--extend continues from the trained weights.*\n  model\.connector\.name"):
        run_training(load_config(changed), progress=False, on_change="extend")
