"""The recipe reference is generated from the config models, and docs/recipes.md is that output."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from vlmkit.cli import app
from vlmkit.config import Config, StageConfig, load_config
from vlmkit.recipe_reference import reference_markdown, template_path

DOC = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"


def test_docs_recipes_md_is_the_generated_reference():
    assert DOC.read_text() == reference_markdown(), "regenerate it: vlmkit recipe --schema > docs/recipes.md"


def test_every_field_is_described_in_the_reference():
    text = reference_markdown()
    for model, section in ((StageConfig, "train.stages.NAME"), (Config.model_fields["train"].annotation, "train")):
        for name, field in model.model_fields.items():
            assert field.description, f"{section}.{name} has no docstring"
            assert f"| `{section}.{name}` |" in text
    assert "| `train.stages.NAME.max_steps` | integer or null (> 0) | `null` | Optimizer steps; overrides `epochs`. |" in text
    assert "Registered: `efficientnet-lite0`" in text


def test_schema_command_prints_the_reference():
    result = CliRunner().invoke(app, ["recipe", "--schema"])
    assert result.exit_code == 0 and result.output == reference_markdown()


def test_template_validates_and_resolves_its_data_next_to_itself(tmp_path):
    result = CliRunner().invoke(app, ["recipe", "--template", str(tmp_path / "proj" / "recipe.yaml")])
    assert result.exit_code == 0, result.output
    written = tmp_path / "proj" / "recipe.yaml"
    assert written.read_text() == template_path().read_text()
    config = load_config(written)
    assert config.train.stages["sft"].data == str(tmp_path / "proj" / "train.json")
    assert "init_from: runs/quickstart/checkpoints/instruct" in written.read_text()
    # The commented-out alternatives are valid too.
    tree = yaml.safe_load(written.read_text())
    tree["model"] = {"init_from": None}
    tree["train"]["stages"]["sft"].update(trainable=["connector", "llm"], part_lr={"llm": 2.0e-5})
    load_config(tree)
    again = CliRunner().invoke(app, ["recipe", "--template", str(written)])
    assert again.exit_code != 0 and "exists" in again.output
