"""A new user's first hour, through the `vlmkit` command in a fresh folder: write a 20-image
LLaVA dataset, start from the template recipe, train, change a setting and be refused, fine-tune
from the checkpoint with `model.init_from`, chat with the result, print the recipe reference.

Every step runs the real command in a subprocess (a tiny random model stands in for the packaged
parts); messages are asserted by content, and no step may print a traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from _cli import vlmkit
from PIL import Image

from tests._tiny import tiny_config

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 30)}




def write_dataset(folder: Path, n: int = 20, n_test: int = 4) -> None:
    """n images of one coloured square each, and a LLaVA JSON asking for the colour; n_test more
    as the held-out file (test.json) the template recipe checks against."""
    (folder / "images").mkdir(parents=True)
    records = []
    for i in range(n + n_test):
        name = list(COLOURS)[i % len(COLOURS)]
        image = Image.new("RGB", (48, 40), (255, 255, 255))
        image.paste(COLOURS[name], (8 + i % 5, 6, 36, 30))
        image.save(folder / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": name}]})
    (folder / "train.json").write_text(json.dumps(records[:n], indent=1))
    (folder / "test.json").write_text(json.dumps(records[n:], indent=1))


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("first-hour")


@pytest.fixture(scope="module")
def trained(home) -> Path:
    """Steps 1-3: the dataset, the template recipe (with a tiny model), a training run."""
    project = home / "my-project"
    write_dataset(project)
    out = vlmkit(home, "recipe", "--template", "my-project/recipe.yaml")
    assert "wrote my-project/recipe.yaml" in out.stdout
    recipe = project / "recipe.yaml"
    tree = yaml.safe_load(recipe.read_text())
    tree["model"] = tiny_config("mlp").model_dump(mode="json", exclude_none=True)
    recipe.write_text(yaml.safe_dump(tree, sort_keys=False))

    check = vlmkit(home, "recipe", "--check", "my-project/recipe.yaml")
    assert f"stage sft: 20 records in {project / 'train.json'}" in check.stdout
    # Run from the project's parent: `data: train.json` still means the file next to the recipe.
    run = vlmkit(home, "train", "my-project/recipe.yaml")
    # 20 records, batch 8: 3 steps an epoch, 3 epochs.
    assert "stage sft: 9 steps, final loss" in run.stdout
    return home / "runs" / "my-data" / "checkpoints" / "sft"


def test_rerun_loads_and_a_changed_setting_is_refused(home, trained):
    again = vlmkit(home, "train", "my-project/recipe.yaml")
    assert f"stage sft: already trained with these settings; loaded {Path('runs/my-data/checkpoints/sft')}" in again.stdout
    assert "nan" not in again.stdout

    refused = vlmkit(home, "train", "my-project/recipe.yaml", "train.stages.sft.lr=0.01", ok=False)
    assert refused.returncode == 2
    assert "error: stage 'sft' is already trained" in refused.stderr
    assert "train.stages.sft.lr: checkpoint 0.001, now 0.01" in refused.stderr
    assert "--restart" in refused.stderr and "--extend" in refused.stderr
    assert refused.stdout == ""


def test_bad_input_is_named_before_any_model_loads(home, trained):
    typo = vlmkit(home, "train", "my-project/recipe.yaml", "train.stages.sft.max_step=3", ok=False)
    assert typo.returncode == 2 and "train.stages.sft.max_step: unknown key; did you mean 'max_steps'?" in typo.stderr
    records = json.loads((home / "my-project" / "train.json").read_text())
    records[7]["image"] = "images/missing.png"
    broken = home / "my-project" / "broken.json"
    broken.write_text(json.dumps(records))
    missing = vlmkit(home, "train", "my-project/recipe.yaml", f"train.stages.sft.data={broken}", ok=False)
    assert missing.returncode == 2
    assert f"record '7': {home / 'my-project' / 'images' / 'missing.png'}" in missing.stderr
    assert "stage 'sft'" in missing.stderr
    bad_override = vlmkit(home, "train", "my-project/recipe.yaml", "max_steps", ok=False)
    assert bad_override.returncode == 2 and "'max_steps' is not an override" in bad_override.stderr


def test_fine_tune_from_the_checkpoint_then_chat(home, trained):
    tune = home / "tune"
    tune.mkdir()
    (tune / "tune.yaml").write_text(yaml.safe_dump({
        "model": {"init_from": str(trained)},
        "train": {"output_dir": "runs/tuned", "stages": {
            "more": {"data": "../my-project/train.json", "trainable": ["connector"], "lr": 5.0e-4, "max_steps": 2, "batch_size": 4}}},
    }))
    run = vlmkit(tune, "train", "tune.yaml", "--device", "cpu")
    assert f"model: starting from {trained}" in run.stdout
    assert "stage more: 2 steps, final loss" in run.stdout
    checkpoint = tune / "runs" / "tuned" / "checkpoints" / "more"

    # The fine-tuned checkpoint carries what it started from: it loads with the source gone.
    shutil.move(str(trained.parent.parent), str(home / "moved-away"))
    try:
        image = home / "my-project" / "images" / "0.png"
        once = vlmkit(home, "chat", "--checkpoint", str(checkpoint), "--image", str(image), "--max-new-tokens", "4",
                      "What colour is the square?")
        session = vlmkit(home, "chat", "--checkpoint", str(checkpoint), "--max-new-tokens", "4", stdin=(
            f"/image {image}\nWhat colour is the square?\n/image my-project/images/nope.png\nAnd the background?\n/quit\n"))
    finally:
        shutil.move(str(home / "moved-away"), str(trained.parent.parent))
    # The first turn of a conversation is the one-shot question; the model loads once for both turns.
    assert session.stdout.startswith(once.stdout)
    assert len(session.stdout) > len(once.stdout)
    assert f"error: no such image file: {home / 'my-project' / 'images' / 'nope.png'}" in session.stderr
    assert f"image {image} attached" in session.stderr


def test_recipe_reference(home):
    ref = vlmkit(home, "recipe", "--schema")
    assert "| `train.stages.NAME.max_steps` | integer or null (> 0) | `null` | Optimizer steps; overrides `epochs`. |" in ref.stdout
    assert "| `model.init_from` |" in ref.stdout
    version = vlmkit(home, "--version")
    assert version.stdout.startswith("vlmkit ")
