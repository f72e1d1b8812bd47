"""A new user's first day with a held-out file, as they would run it from an empty folder: write
`recipe --template`, put their own data next to it (`vlmkit data synth-train` stands in for it),
train (the template's held-out checks score test.json while training), then score the checkpoint
on the same file with `vlmkit eval run -b custom:test.json`.

Each step is the real command in a subprocess; a tiny random model stands in for the packaged
parts (the template's recipe is otherwise as written, fewer steps aside)."""

from __future__ import annotations

import json

import yaml
from _cli import vlmkit

from tests._tiny import tiny_config


def test_template_trains_with_heldout_checks_then_eval_run_scores_the_file(tmp_path):
    vlmkit(tmp_path, "recipe", "--template", "recipe.yaml")
    template = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    # The template's own choices, before the tiny model replaces the packaged parts.
    assert list(template["train"]["stages"]) == ["embed", "sft"]
    assert template["train"]["stages"]["embed"]["loss"] == "embed-align"
    assert template["train"]["precision"] == "auto" and template["model"]["system_prompt"] == ""
    assert template["model"]["connector"] == {"name": "pixel-shuffle", "options": {"ratio": 0.5, "norm": "post", "projector": "mlp"},
                                              "output_norm": "text"}
    assert template["train"]["eval"]["benchmark"] == "custom" and template["train"]["eval"]["data"] == "test.json"

    vlmkit(tmp_path, "data", "synth-train", ".", "--n", "24", "--n-test", "6", "--n-video", "0")
    template["model"] = tiny_config("pixel-shuffle").model_dump(mode="json", exclude_none=True)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(template, sort_keys=False))

    check = vlmkit(tmp_path, "recipe", "--check", "recipe.yaml")
    assert f"train.eval: 6 held-out items (custom) in {tmp_path / 'test.json'}" in check.stdout
    vlmkit(tmp_path, "train", "recipe.yaml", "train.stages.embed.epochs=1", "train.stages.sft.epochs=1")
    checks = [json.loads(line) for line in (tmp_path / "runs" / "my-data" / "metrics.jsonl").read_text().splitlines()]
    checks = [c for c in checks if c.get("event") == "eval"]
    assert checks and {c["stage"] for c in checks} == {"sft"} and checks[-1]["benchmark"] == "custom"
    assert checks[-1]["items"] == 6

    run = vlmkit(tmp_path, "eval", "run", "-b", "custom:test.json", "-m", "vlmkit:runs/my-data/checkpoints/sft",
                 "--batch-size", "16", "--no-progress", "--json")
    result = json.loads(run.stdout)
    assert result["benchmark"] == "custom" and result["n_items"] == 6 and result["n_missing"] == 0
    assert result["metric"].startswith("exact: ")
    # Per record task (the synthetic set's `task` field): the single-image and the two-image questions.
    assert set(result["breakdown"]) <= {"image", "second-image", "first-image"} and result["breakdown"]
    # The same questions, the same final weights and the same batch: the score the training run's
    # last held-out check logged.
    assert result["overall"] == checks[-1]["overall"]
    predictions = (tmp_path / "eval-out" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 6
