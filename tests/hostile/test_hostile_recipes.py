"""Hostile recipes and overrides: YAML alias bombs and duplicate keys are refused naming the file,
key and line; every number in the schema is finite and in range; `train.num_workers` is capped at
the CPUs; a huge `grad_accum` streams its micro-batches instead of gathering them all first."""

from __future__ import annotations

import math
import os
import resource
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from tests._tiny import tiny_config
from vlmkit.cli import app
from vlmkit.config import Config, ConfigError, DataSource, StageConfig, TrainEvalConfig, load_config
from vlmkit.model.vlm import VisionLanguageModel

SRC = Path(__file__).resolve().parents[2] / "src"

# 9 levels of 9 aliases: 307 bytes of YAML naming 9**9 (387 million) strings.
BOMB = "a: &a [" + ",".join(["lol"] * 9) + "]\n" + "".join(
    f"{n}: &{n} [{','.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


def check(*args):
    return CliRunner().invoke(app, ["recipe", "--check", *map(str, args)])


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, 2 * 1024**3))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from vlmkit.data.synthetic.tasks import generate as generate_data

    out = tmp_path_factory.mktemp("synth")
    generate_data(out, n_caption=8, n_instruct=12, n_test=2, seed=3)
    return out


def recipe(data_dir: Path, out: Path, **stage) -> dict:
    stages = {"instruct": {"data": str(data_dir / "stage2.json"), "trainable": ["connector", "llm"], "lr": 3e-3,
                           "batch_size": 4, "max_steps": 2, **stage}}
    return {"model": tiny_config("mlp").model_dump(mode="json"), "train": {"output_dir": str(out), "stages": stages}}


# ---- YAML: alias bombs, recursive aliases, duplicate keys ------------------------------------

def test_alias_bomb_is_refused_at_once_naming_the_file(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert len(BOMB) < 400
    # In a child bounded in time and memory: unguarded, this expands until it is killed.
    r = subprocess.run([sys.executable, "-m", "vlmkit.cli", "recipe", "--check", str(bomb)], capture_output=True, text=True,
                       timeout=60, preexec_fn=_limit_memory, env={**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"error: recipe {bomb}: YAML aliases expand the recipe by more than 10000 nodes" in r.stderr
    assert "Traceback" not in r.stderr


def test_alias_bomb_in_an_override_is_refused():
    value = "[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], " \
            "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]]"
    with pytest.raises(ConfigError, match=r"override 'train\.seed=.*YAML aliases expand"):
        load_config(None, [f"train.seed={value}"])


def test_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("train:\n  stages: &s\n    again: *s\n")
    with pytest.raises(ConfigError, match=r"loop\.yaml: line 2: a YAML alias at train\.stages\.again refers to itself"):
        load_config(path)


def test_modest_aliases_and_merge_keys_still_work(data_dir, tmp_path):
    path = tmp_path / "shared.yaml"
    path.write_text(f"""train:
  stages:
    a: &common
      data: {data_dir / "stage1.json"}
      trainable: [connector]
      lr: 1.0e-3
    b:
      <<: *common
      lr: 2.0e-3
""")
    config = load_config(path)
    assert config.train.stages["b"].lr == 2e-3 and config.train.stages["b"].trainable == ["connector"]


def test_duplicate_train_key_is_refused_by_check_and_train(data_dir, tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(f"""train:
  stages:
    sft: {{data: {data_dir / "stage2.json"}, trainable: [connector], lr: 1.0e-3}}
train:
  seed: 1
""")
    result = check(path)
    assert result.exit_code == 2, result.output
    assert f"error: recipe {path}: line 4: duplicate key 'train' (first given at line 1" in result.output
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2 and "duplicate key 'train'" in result.output, result.output


def test_duplicate_key_deep_in_the_recipe_names_its_dotted_path(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("train:\n  stages:\n    sft:\n      lr: 1.0e-3\n      data: x.json\n      lr: 1.0e-2\n")
    with pytest.raises(ConfigError, match=r"deep\.yaml: line 6: duplicate key 'train\.stages\.sft\.lr' \(first given at line 4"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override 'train\.stages=\{a: 1, a: 2\}': line 1: duplicate key 'a'"):
        load_config(None, ["train.stages={a: 1, a: 2}"])


def test_non_utf8_and_malformed_recipes_name_the_file(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"train:\n  seed: \xff\n")
    with pytest.raises(ConfigError, match=r"recipe .*bin\.yaml is not UTF-8 text"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override 'train\.seed=\[' is not valid YAML"):
        load_config(None, ["train.seed=["])
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match=r"recipe .*deep\.yaml: YAML nested too deeply"):
        load_config(deep)


# ---- numbers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("train.stages.instruct.lr=1e309", "train.stages.instruct.lr"),
    ("train.stages.instruct.lr=nan", "train.stages.instruct.lr"),
    ("train.stages.instruct.lr=5", "train.stages.instruct.lr"),
    ("train.stages.instruct.weight_decay=1e309", "train.stages.instruct.weight_decay"),
    ("train.stages.instruct.max_grad_norm=-1", "train.stages.instruct.max_grad_norm"),
    ("train.stages.instruct.max_grad_norm=nan", "train.stages.instruct.max_grad_norm"),
    ("train.stages.instruct.epochs=1e309", "train.stages.instruct.epochs"),
    ("train.stages.instruct.max_steps=1e309", "train.stages.instruct.max_steps"),
    ("train.stages.instruct.part_lr={llm: -1}", "train.stages.instruct.part_lr.llm"),
    ("train.stages.instruct.dpo.beta=inf", "train.stages.instruct.dpo.beta"),
    ("train.stages.instruct.grad_accum=1000000000", "train.stages.instruct.grad_accum"),
    (f"train.seed={2**32}", "train.seed"),
    ("train.seed=-1", "train.seed"),
    ("train.feature_cache_gb=.inf", "train.feature_cache_gb"),
    ("train.prefetch=1000000", "train.prefetch"),
    ("model.processor.std=[0, 0.5, 0.5]", "model.processor.std"),
    ("model.processor.mean=[.nan, 0.5, 0.5]", "model.processor.mean.0"),
])
def test_non_finite_and_nonsensical_numbers_are_refused_naming_the_key(data_dir, tmp_path, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(recipe(data_dir, tmp_path / "run"), [override])
    assert f"\n  {key}: " in str(err.value)


def test_check_refuses_a_non_finite_override_in_one_error_line(data_dir, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"train:\n  stages:\n    instruct: {{data: {data_dir / 'stage2.json'}, trainable: [connector], lr: 1.0e-3}}\n")
    result = check(path, "train.stages.instruct.lr=1e309", "train.seed=4294967296")
    assert result.exit_code == 2, result.output
    assert "error: invalid config" in result.output and "Traceback" not in result.output
    assert "train.stages.instruct.lr: Input should be a finite number" in result.output
    assert "train.seed: Input should be less than or equal to 4294967295" in result.output
    assert check(path, "train.seed=4294967295").exit_code == 0


def _annotation_has(annotation, kind) -> bool:
    if annotation is kind:
        return True
    return any(_annotation_has(a, kind) for a in typing.get_args(annotation))


def _sections():
    from vlmkit.recipe_reference import _sections as walk

    return [(name, model) for name, model in walk(Config, "") if name]


REQUIRED = {StageConfig: {"data": "x.json", "trainable": ["llm"], "lr": 1e-3}, DataSource: {"path": "x"},
            TrainEvalConfig: {"benchmark": "b", "data": "d"}}


def test_every_float_in_the_schema_must_be_finite():
    # Systematic, over every section and field: inf and nan are refused wherever a float goes.
    seen = 0
    for section, model in _sections():
        for name, field in model.model_fields.items():
            if not _annotation_has(field.annotation, float):
                continue
            for bad in (math.inf, -math.inf, math.nan):
                value = {"llm": bad} if typing.get_origin(field.annotation) is dict else (bad, 0.5, 0.5) \
                    if typing.get_origin(field.annotation) is tuple else bad
                with pytest.raises(ValidationError, match="finite number"):
                    model.model_validate({**REQUIRED.get(model, {}), name: value})
                seen += 1
    assert seen >= 3 * 10


SIGNED_INTS = {"feature_layer"}  # a negative hidden-state index counts from the last layer


def test_every_integer_in_the_schema_has_a_lower_bound():
    for section, model in _sections():
        for name, field in model.model_fields.items():
            if _annotation_has(field.annotation, int) and not _annotation_has(field.annotation, bool) and name not in SIGNED_INTS:
                bounds = [m for m in field.metadata if getattr(m, "gt", None) is not None or getattr(m, "ge", None) is not None]
                assert bounds, f"{section}.{name} has no lower bound"


# ---- num_workers -----------------------------------------------------------------------------

def test_num_workers_is_capped_at_the_cpus_with_a_warning(monkeypatch):
    from vlmkit.data.pipeline import make_loader

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    # Building the loader starts no worker; the count it would start is what is checked.
    with pytest.warns(UserWarning, match=r"train\.num_workers=100000 is more than the 3 CPU\(s\)"):
        loader = make_loader([0, 1], [0, 1], 100000, False)
    assert loader.num_workers == 3
    assert make_loader([0, 1], [0, 1], 2, False).num_workers == 2
    assert load_config(None, ["train.num_workers=100000"]).train.num_workers == 100000  # the recipe says what was asked


# ---- grad_accum ------------------------------------------------------------------------------

def tiny_model(seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    return VisionLanguageModel.build(tiny_config("mlp"), pretrained=False)


class FirstForward(Exception):
    pass


def test_huge_grad_accum_runs_the_first_forward_before_gathering_the_step(data_dir, tmp_path, monkeypatch):
    from vlmkit.data.pipeline import StageInput
    from vlmkit.train import loop
    from vlmkit.train.objectives import SFTObjective

    fetched = []
    original_next = StageInput.next

    def counting_next(self):
        fetched.append(1)
        assert len(fetched) <= 100, "the step gathered its micro-batches before the first forward"
        return original_next(self)

    def first_forward(self, *args, **kwargs):
        raise FirstForward(len(fetched))

    monkeypatch.setattr(StageInput, "next", counting_next)
    monkeypatch.setattr(SFTObjective, "loss", first_forward)
    config = load_config(recipe(data_dir, tmp_path / "run", grad_accum=65536, max_steps=1, batch_size=1))
    with pytest.raises(FirstForward) as first:
        loop.run_training(config, model=tiny_model(), progress=False)
    assert first.value.args[0] <= loop.GATHERED_MICRO_BATCHES


def test_streamed_accumulation_trains_as_the_gathered_one(data_dir, tmp_path, monkeypatch):
    from vlmkit.train import loop

    clip = loop._clip
    runs = {}
    for gathered in (32, 1):  # 32: the step's 3 micro-batches are read whole first; 1: streamed
        grads = []

        def recording_clip(model, optimizer, max_norm):
            grads.append([p.grad.clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None])
            return clip(model, optimizer, max_norm)

        monkeypatch.setattr(loop, "GATHERED_MICRO_BATCHES", gathered)
        monkeypatch.setattr(loop, "_clip", recording_clip)
        config = load_config(recipe(data_dir, tmp_path / f"g{gathered}", grad_accum=3, max_steps=3, batch_size=2))
        _, (result,) = loop.run_training(config, model=tiny_model(), progress=False)
        runs[gathered] = (result.losses, grads[0])
    (streamed_losses, streamed_grads), (losses, grads) = runs[1], runs[32]
    assert streamed_losses[0] == losses[0]  # before any update: the same sums, divided the same way
    assert streamed_losses == pytest.approx(losses, rel=1e-5)
    # The step's gradient: summed, then divided by the step's count, instead of divided first.
    assert len(streamed_grads) == len(grads)
    for a, b in zip(streamed_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_a_recipe_without_stages_is_refused_by_check_and_train(tmp_path):
    path = tmp_path / "nostage.yaml"
    path.write_text("train:\n  seed: 1\n")
    for command in (["recipe", "--check"], ["train"]):
        result = CliRunner().invoke(app, [*command, str(path)])
        assert result.exit_code == 2, result.output
        assert "error: the recipe has no train.stages: nothing to train" in result.output
