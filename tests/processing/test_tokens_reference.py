"""`vlmkit tokens` gives, number for number, what it gave before its presets moved into the one
registry (`vlmkit.presets`): outputs recorded from the earlier code in tests/data/tokens_reference.json.

The recorded numbers are the ones that match the reference processors (transformers, the
released preprocessor configs); nothing here may drift when the preset data is reorganised.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmkit.cli import app

REFERENCE = json.loads((Path(__file__).parents[1] / "data" / "tokens_reference.json").read_text())
runner = CliRunner()


def _tokens(args: list[str]):
    return runner.invoke(app, ["tokens", *args])


def _id(case: dict) -> str:
    return " ".join(case["args"])


# Keys added since the recording: the labelled FLOPs of an image, and whether a video
# fits the context. Every recorded key keeps its recorded value; nothing else may appear.
ADDED_KEYS = {"image": {"flops"}, "video": {"context", "context_share", "fits"}}


def _recorded_part(out: dict, recorded: dict, kind: str) -> dict:
    assert set(out) - set(recorded) <= ADDED_KEYS[kind], set(out) - set(recorded)
    return {k: out[k] for k in out if k in recorded}


@pytest.mark.parametrize("case", REFERENCE["json"], ids=_id)
def test_image_budget_json_unchanged(case):
    res = _tokens(case["args"])
    assert res.exit_code == case["exit_code"], res.output
    if case["exit_code"] == 0:
        assert _recorded_part(json.loads(res.output), case["json"], "image") == case["json"]
    else:
        assert res.output == case["output"]


@pytest.mark.parametrize("case", REFERENCE["text"], ids=_id)
def test_image_budget_text_unchanged(case):
    res = _tokens(case["args"])
    assert (res.exit_code, res.output) == (case["exit_code"], case["output"])


@pytest.mark.parametrize("case", REFERENCE["video"], ids=_id)
def test_video_budget_unchanged(case):
    res = _tokens(case["args"])
    assert res.exit_code == case["exit_code"], res.output
    assert _recorded_part(json.loads(res.output), case["json"], "video") == case["json"]


def test_lecture_table_unchanged():
    assert _tokens(REFERENCE["table"]["args"]).output == REFERENCE["table"]["output"]
    assert json.loads(_tokens(REFERENCE["table_json"]["args"]).output) == REFERENCE["table_json"]["json"]


def test_listed_presets_unchanged():
    # The registry lists more presets than before; each earlier line is still there, word for word.
    lines = _tokens(["--list"]).output.splitlines()
    missing = [line for line in REFERENCE["list_lines"] if line not in lines]
    assert not missing


def test_every_recorded_preset_is_covered():
    recorded = {c["args"][1] for c in REFERENCE["json"]}
    assert len(recorded) == 14 and {"llava-next-7b", "internvl2-76b-40tiles", "anyres-seed", "anyres-seed-shuffle", "smolvlm-256m"} <= recorded
