"""User errors at the command line: `chat`, `train`, `serve` and `eval` end with one `error:` line
naming the problem (no traceback); `--debug` or VLMKIT_DEBUG=1 shows the traceback."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import tiny_config
from PIL import Image
from typer.testing import CliRunner

from vlmkit.cli import app
from vlmkit.config import load_config
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit import checkpoint as ckpt

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = VisionLanguageModel.build(tiny_config("mlp"), pretrained=False)
    cfg = load_config({"model": tiny_config("mlp").model_dump(mode="json")})
    model.set_trainable(["connector"])
    out = tmp_path_factory.mktemp("ck") / "ck"
    ckpt.save_checkpoint(out, model, cfg)
    return out


def run(args, env=None):
    return CliRunner().invoke(app, args, env=env)


def assert_error_line(result, text, code=1):
    assert result.exit_code == code, result.output
    assert f"error: {text}" in result.output, result.output
    assert "Traceback" not in result.output


def test_chat_missing_checkpoint(tmp_path):
    # A path that does not exist is a usage error, caught before anything loads.
    result = run(["chat", "hi", "--checkpoint", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.output and "Traceback" not in result.output
    # A folder that is not a checkpoint is named in one error line.
    (tmp_path / "empty").mkdir()
    result = run(["chat", "hi", "--checkpoint", str(tmp_path / "empty")])
    assert_error_line(result, f"{tmp_path / 'empty'} is not a vlmkit checkpoint (no config.json)")


def test_chat_bad_images(checkpoint, tmp_path):
    eps = tmp_path / "photo.png"
    eps.write_bytes(EPS)
    result = run(["chat", "What?", "--checkpoint", str(checkpoint), "--image", str(eps)])
    assert_error_line(result, "record 'prompt': ")
    assert "photo.png: cannot decode image: not an image in an allowed format" in result.output
    result = run(["chat", "What?", "--checkpoint", str(checkpoint), "--image", str(tmp_path / "missing.png")])
    assert result.exit_code == 2 and "missing.png" in result.output and "does not exist" in result.output
    assert "Traceback" not in result.output
    big = tmp_path / "wide.png"
    Image.new("RGB", (5000, 2)).save(big)
    result = run(["chat", "What?", "--checkpoint", str(checkpoint), "--image", str(big)])
    assert "aspect ratio 2500:1" in result.output and result.exit_code == 1


def test_chat_tiny_top_p_samples_instead_of_crashing(checkpoint):
    result = run(["chat", "hi", "--checkpoint", str(checkpoint), "--temperature", "1", "--top-p", "1e-300", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args, message", [
    (["--top-p", "0"], "top-p"),
    (["--seed", str(2**64)], "seed"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
])
def test_chat_out_of_range_options_are_usage_errors(checkpoint, args, message):
    result = run(["chat", "hi", "--checkpoint", str(checkpoint), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_debug_flag_and_environment_show_the_traceback(tmp_path):
    (tmp_path / "nope").mkdir()
    for args, env in ((["--debug"], None), ([], {"VLMKIT_DEBUG": "1"})):
        result = run([*args, "chat", "hi", "--checkpoint", str(tmp_path / "nope")], env=env)
        assert isinstance(result.exception, FileNotFoundError)
        assert "error:" not in result.output


def test_train_missing_and_bad_recipes(tmp_path):
    # `train` reports recipe and data errors with exit status 2, as `eval` does.
    assert_error_line(run(["train", str(tmp_path / "none.yaml")]), f"recipe file not found: {tmp_path / 'none.yaml'}", code=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  stages:\n    a: {data: x.json, trainable: [connector], lr: 0.001, batchsize: 4}\n")
    assert_error_line(run(["train", str(recipe)]), "", code=2)
    assert "train.stages.a.batchsize" in run(["train", str(recipe)]).output
    recipe.write_text("train: [unclosed\n")
    assert_error_line(run(["train", str(recipe)]), "", code=2)


def test_train_bad_record_names_it(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "rec-1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 5}]}]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "model": tiny_config("mlp").model_dump(mode="json"),
        "train": {"output_dir": str(tmp_path / "run"), "stages": {"s": {"data": str(data), "trainable": ["connector"], "lr": 1e-3, "max_steps": 1}}},
    }))
    result = run(["train", str(recipe)])
    assert_error_line(result, f"stage 's': 1 unusable record(s) in {data}", code=2)
    assert f"{data}: record 'rec-1': conversation turn 1 'value' must be a string, got int" in result.output


def test_serve_user_errors(checkpoint, tmp_path):
    assert_error_line(run(["serve", "--checkpoint", str(tmp_path / "nope")]), f"{tmp_path / 'nope'} is not a vlmkit checkpoint")
    result = run(["serve", "--checkpoint", str(checkpoint), "--image-format", "EPS"])
    assert result.exit_code == 2 and "external program" in result.output and "Traceback" not in result.output


def test_an_unexpected_error_is_one_line_with_a_hint(monkeypatch, tmp_path):
    import vlmkit.checkpoint as module

    def broken(*args, **kwargs):
        raise KeyError("weights")

    monkeypatch.setattr(module, "load_checkpoint", broken)
    result = run(["chat", "hi", "--checkpoint", str(tmp_path)])
    assert_error_line(result, "KeyError: 'weights' (run with --debug or VLMKIT_DEBUG=1 for the traceback)")


def test_eval_keeps_its_error_line(tmp_path):
    result = run(["eval", "run", "-b", "chartqa", "-d", str(tmp_path / "nodata"), "-m", "vlmkit:/nowhere", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "Traceback" not in result.output
