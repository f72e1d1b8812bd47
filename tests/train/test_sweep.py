"""`vlmkit ablate`: the cells a sweep crosses, refused keys, a killed sweep resumed without
training a cell twice, the seed-pooled bootstrap intervals and the reports' shape."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from vlmkit.eval import stats
from vlmkit.train import sweep_report
from vlmkit.train.sweep import SweepDefinition, SweepError, parse_vary, run_sweep

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import TINY_SECTIONS as TINY  # noqa: E402

TINY_DATA = {"n_caption": 3, "n_instruct": 6, "n_test": 12, "n_instruct_more": 0}


def tiny_recipe(folder: Path) -> Path:
    """The quickstart's two stages (embed-align, then instruct) on a tiny random model."""
    recipe = {
        "model": {**TINY, "connector": {"name": "pixel-shuffle", "options": {"ratio": 0.5}, "output_norm": "text"}, "system_prompt": ""},
        "train": {"max_length": 1024, "stages": {
            "embed": {"data": "stage2.json", "loss": "embed-align", "trainable": ["connector"], "lr": 1e-3, "batch_size": 2, "max_steps": 2},
            "instruct": {"data": "stage2.json", "trainable": ["connector"], "lr": 1e-3, "batch_size": 2, "max_steps": 2}}},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def definition(recipe: Path, vary=("model.processor.image_size=32,64", "train.stages.instruct.lr=0.001,0.002"), seeds=(0, 1)):
    return SweepDefinition(str(recipe), [], [parse_vary(v) for v in vary], list(seeds), "quickstart", dict(TINY_DATA))


class FakeRunner:
    """Stands in for training: each held-out item is right or wrong by a hash of the cell's values,
    seed and the item, so reruns give the same table; counts its calls per cell."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[str] = []
        self.fail_at = fail_at

    def __call__(self, config, test, data_dir):
        name = Path(config.train.output_dir).name
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt("killed")
        self.calls.append(name)
        items = [{"id": r["id"], "kind": r["kind"], "difficulty": None, "prediction": "x",
                  "correct": float(hashlib.md5(f"{name}/{r['id']}".encode()).digest()[0] % 2)} for r in test]
        return {"accuracy": {}, "accuracy_by_difficulty": {}, "visual_tokens": config.model.processor.image_size // 16,
                "memory_tokens": 0, "prompt_tokens": 20, "prefill_flops": {"total": 2e9}, "trainable_parameters": 1000,
                "trainable_by_stage": {}, "train_seconds": 1.0, "train_wall_seconds": 1.0, "train_cpu_seconds": 1.0,
                "eval_seconds": 0.1, "stages": [], "items": items}


def test_cells_cross_two_keys_and_two_seeds(tmp_path):
    d = definition(tiny_recipe(tmp_path))
    cells = d.cells()
    assert [(c.values["model.processor.image_size"], c.values["train.stages.instruct.lr"], c.seed) for c in cells] == [
        (s, lr, seed) for s in ("32", "64") for lr in ("0.001", "0.002") for seed in (0, 1)]
    assert len({c.name for c in cells}) == 8 and len({c.group for c in cells}) == 4
    assert cells[0].name == "model.processor.image_size=32__train.stages.instruct.lr=0.001__seed=0"
    assert parse_vary("model.processor.image_size=32,64").values == [32, 64]  # YAML scalars
    assert parse_vary("connector=mlp,qformer").texts == ("mlp", "qformer-32")  # an earlier name of a bundle


def test_cell_configs_carry_values_seed_and_bundle(tmp_path):
    from vlmkit.train.sweep import cell_config

    recipe = tiny_recipe(tmp_path)
    d = SweepDefinition(str(recipe), ["train.stages.embed.max_steps=3"], [parse_vary("connector=pooling,cross-attn"),
                                                                         parse_vary("model.processor.image_size=64")], [5])
    pooled, cross = d.cells()
    config, dropped = cell_config(d, pooled, tmp_path / "sweep")
    assert (config.model.connector.name, config.model.connector.options, config.model.connector.output_norm) == (
        "pooling", {"kernel": 2, "input_norm": True}, "text")
    assert config.model.processor.image_size == 64 and config.train.seed == 5 and dropped == []
    assert config.train.stages["embed"].max_steps == 3
    assert Path(config.train.output_dir) == (tmp_path / "sweep" / "cells" / pooled.name).resolve()
    assert config.train.stages["instruct"].data == str((tmp_path / "sweep" / "data" / "stage2.json").resolve())
    config, dropped = cell_config(d, cross, tmp_path / "sweep")
    # Cross-attention blocks train where the connector does; embed-align cannot train them.
    assert config.model.fusion == "cross-attention" and dropped == ["embed"]
    assert list(config.train.stages) == ["instruct"] and config.train.stages["instruct"].trainable == ["connector", "cross_attention"]


@pytest.mark.parametrize("key, message", [
    ("model.procesor.image_size", "has no key 'model.procesor'; did you mean 'model.processor'?"),
    ("train.stages.instruc.lr", "has no key 'train.stages.instruc'; did you mean 'train.stages.instruct'?"),
    ("model.processor.image_size.x", "model.processor.image_size holds a value, not keys"),
    ("train.seed", "the sweep sets it for each cell (give the seeds with --seeds)"),
])
def test_a_key_the_recipe_lacks_is_refused_by_name(tmp_path, key, message):
    d = definition(tiny_recipe(tmp_path), vary=(f"{key}=1,2",))
    with pytest.raises(SweepError, match="--vary " + key.replace(".", r"\.") + ":") as e:
        run_sweep(d, tmp_path / "sweep", runner=FakeRunner(), progress=False)
    assert message in str(e.value)
    assert not (tmp_path / "sweep" / "sweep.json").exists()  # nothing started


def test_bad_values_and_bundles_are_refused_before_training(tmp_path):
    recipe = tiny_recipe(tmp_path)
    with pytest.raises(SweepError, match="unknown connector bundle 'qfromer-8'; did you mean 'qformer-8'"):
        parse_vary("connector=mlp,qfromer-8")
    runner = FakeRunner()
    # An option the connector does not take, under its free-form options: refused by the connector.
    d = definition(recipe, vary=("model.connector.options.ratoi=0.25,0.5",), seeds=(0,))
    with pytest.raises(SweepError, match="ratoi.*did you mean 'ratio'"):
        run_sweep(d, tmp_path / "sweep", runner=runner, progress=False)
    assert runner.calls == []


def test_a_killed_sweep_resumes_without_training_a_cell_twice(tmp_path):
    recipe = tiny_recipe(tmp_path)
    unbroken = FakeRunner()
    run_sweep(definition(recipe), tmp_path / "unbroken", runner=unbroken, progress=False)
    assert len(unbroken.calls) == 8

    killed = FakeRunner(fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(definition(recipe), tmp_path / "killed", runner=killed, progress=False)
    assert len(killed.calls) == 3 and len(list((tmp_path / "killed" / "cells").glob("*/cell.json"))) == 3
    rerun = FakeRunner()
    run_sweep(definition(recipe), tmp_path / "killed", runner=rerun, progress=False)
    assert sorted(killed.calls + rerun.calls) == sorted(unbroken.calls)  # each cell trained once
    assert (tmp_path / "killed" / "ablation.md").read_text() == (tmp_path / "unbroken" / "ablation.md").read_text()
    again = FakeRunner()
    run_sweep(definition(recipe), tmp_path / "killed", runner=again, progress=False)
    assert again.calls == []
    logged = [json.loads(line) for line in (tmp_path / "killed" / "ablation.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in logged) == sorted(unbroken.calls)


def test_a_different_sweep_in_the_same_folder_is_refused_but_added_cells_are_not(tmp_path):
    recipe = tiny_recipe(tmp_path)
    run_sweep(definition(recipe, seeds=(0,)), tmp_path / "s", runner=FakeRunner(), progress=False)
    with pytest.raises(SweepError, match="leaves out \\['0.002'\\]"):
        run_sweep(definition(recipe, vary=("model.processor.image_size=32,64", "train.stages.instruct.lr=0.001"), seeds=(0,)),
                  tmp_path / "s", runner=FakeRunner(), progress=False)
    more = FakeRunner()
    report = run_sweep(definition(recipe, seeds=(0, 1)), tmp_path / "s", runner=more, progress=False)
    assert len(more.calls) == 4 and all(n.endswith("seed=1") for n in more.calls)
    assert report["definition"]["seeds"] == [0, 1]
    with pytest.raises(SweepError, match="overrides differ"):
        bigger = definition(recipe, seeds=(0, 1))
        bigger.overrides = ["train.stages.instruct.max_steps=3"]
        run_sweep(bigger, tmp_path / "s", runner=FakeRunner(), progress=False)

    # A folder of the user's own is not written into: no data, cells or reports land among its files.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "ablation.md").write_text("my notes")
    with pytest.raises(SweepError, match="not empty and holds no sweep.json"):
        run_sweep(definition(recipe, seeds=(0,)), mine, runner=FakeRunner(), progress=False)
    assert [p.name for p in mine.iterdir()] == ["ablation.md"] and (mine / "ablation.md").read_text() == "my notes"


def _cell(seed: int, scores: dict[str, float], kind="word", difficulty=None, group="g", values=None) -> dict:
    return {"group": group, "values": values or {}, "seed": seed, "visual_tokens": 16, "memory_tokens": 0, "prefill_flops": {"total": None},
            "trainable_parameters": 10, "train_seconds": 1.0, "train_cpu_seconds": 2.0,
            "items": [{"id": i, "kind": kind, "difficulty": difficulty, "correct": s} for i, s in scores.items()]}


def test_interval_pools_seeds_per_item():
    # Two seeds, ten items: items 0-3 right under both seeds, 4-5 under one, 6-9 under neither.
    a = {str(i): float(i < 5) for i in range(10)}
    b = {str(i): float(i < 4 or i == 5) for i in range(10)}
    row = sweep_report.aggregate([_cell(0, a), _cell(1, b)])[0]
    per_item = np.array([1, 1, 1, 1, 0.5, 0.5, 0, 0, 0, 0])
    assert row["accuracy"]["word"]["mean"] == pytest.approx(0.5) and row["accuracy"]["word"]["items"] == 10
    assert row["accuracy"]["word"]["ci"] == list(stats.bootstrap_ci(per_item))
    # Resampling (item, seed) pairs as independent draws would be a narrower, wrong interval.
    flat = stats.bootstrap_ci(np.array(list(a.values()) + list(b.values())))
    assert row["accuracy"]["word"]["ci"] != list(flat)
    lo, hi = row["accuracy"]["word"]["ci"]
    assert hi - lo > flat[1] - flat[0]
    assert row["seeds"] == [0, 1] and row["train_cpu_seconds"] == 2.0


def test_difficulty_rows_and_the_report_shape(tmp_path):
    cells = [_cell(0, {"a": 1.0, "b": 0.0}, difficulty=8), _cell(0, {"c": 1.0}, kind="bar")]
    cells[1]["items"][0]["id"] = "c"
    merged = {**cells[0], "items": cells[0]["items"] + cells[1]["items"]}
    definition_json = {"vary": [], "seeds": [0]}
    report = sweep_report.write_reports(definition_json, [{**merged, "name": "n", "seed": 0}], tmp_path)
    assert set(report) == {"definition", "error_bars", "cells", "rows", "comparisons"} and report["comparisons"] == []
    assert "items" not in report["cells"][0]
    row = report["rows"][0]
    assert set(row["accuracy"]) == {"word", "bar"} and set(row["accuracy_by_difficulty"]) == {"word/8"}
    assert row["overall"]["items"] == 3 and row["accuracy"]["word"]["mean"] == 0.5
    assert set(row["accuracy"]["word"]) == {"mean", "ci", "items"}
    assert json.loads((tmp_path / "ablation.json").read_text()) == json.loads(json.dumps(report))
    md = (tmp_path / "ablation.md").read_text()
    assert "| word acc [95% CI] | bar acc [95% CI] |" in md and "| 50.0% [" in md
    assert (tmp_path / "accuracy_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"


def test_rows_are_compared_with_the_baseline_item_by_item(tmp_path):
    """Each row minus the baseline on the same items, seeds pooled per item: the paired test of
    the pooled scores, overall and per kind; the baseline is the first value unless chosen."""
    words, bars = [str(i) for i in range(12)], [f"b{i}" for i in range(6)]

    def cells(group, value, right):  # two seeds; `right(seed, item)` says which items are right
        return [{**_cell(seed, {i: float(right(seed, i)) for i in words}, group=group, values={"k": value}),
                 "items": [{"id": i, "kind": "word" if i in words else "bar", "difficulty": None, "correct": float(right(seed, i))}
                           for i in words + bars]} for seed in (0, 1)]

    base = cells("k=a", "a", lambda seed, i: i in ("0", "1", "b0"))
    better = cells("k=b", "b", lambda seed, i: i in ("0", "1", "2", "3", "b0") or (seed == 1 and i in ("4", "5")))
    definition_json = {"vary": [{"key": "k", "values": ["a", "b"]}], "seeds": [0, 1]}
    report = sweep_report.write_reports(definition_json, base + better, tmp_path)
    [compared] = report["comparisons"]
    assert compared["group"] == "k=b" and compared["against"] == "k=a"
    pooled_a = [float(i in ("0", "1")) for i in words]
    pooled_b = [1.0 if i in ("0", "1", "2", "3") else 0.5 if i in ("4", "5") else 0.0 for i in words]
    want = stats.paired_test(pooled_a, pooled_b)
    word = compared["difference"]["word"]
    assert word["difference"] == pytest.approx(3 / 12) and word["ci"] == list(want.ci) and word["p_value"] == want.p_value
    assert word["items"] == 12 and compared["difference"]["bar"]["difference"] == 0.0
    assert compared["difference"]["overall"]["items"] == 18
    md = (tmp_path / "ablation.md").read_text()
    assert "Against k=a on the same held-out items" in md and "| b | +16.7 [" in md and "], p 0.04 | +25.0 [" in md
    # Chosen the other way round, the sign flips.
    flipped = sweep_report.write_reports(definition_json, base + better, tmp_path, baseline={"k": "b"})
    assert flipped["comparisons"][0]["difference"]["word"]["difference"] == pytest.approx(-3 / 12)


def test_a_bad_baseline_is_refused_before_any_cell_trains(tmp_path):
    recipe = tiny_recipe(tmp_path)
    runner = FakeRunner()
    with pytest.raises(SweepError, match=r"--baseline model.processor.image_size=48: not one of its values \(32, 64\)"):
        run_sweep(definition(recipe), tmp_path / "s", runner=runner, progress=False, baseline={"model.processor.image_size": "48"})
    with pytest.raises(SweepError, match="seed is not a varied key"):
        run_sweep(definition(recipe), tmp_path / "s", runner=runner, progress=False, baseline={"seed": "1"})
    assert runner.calls == [] and not (tmp_path / "s").exists()


@pytest.mark.parametrize("word, message", [("connector=qformer-8", "--baseline connector=qformer-8: not one of its values (mlp, pooling)"),
                                           ("connectorpooling", "'connectorpooling': expected KEY=VALUE")])
def test_the_command_refuses_a_bad_baseline_before_writing_anything(tmp_path, word, message):
    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "vlmkit.cli", "ablate", str(recipe), "--connectors", "mlp,pooling", "--baseline", word,
           "--out", str(out)]
    done = subprocess.run(cmd, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in " ".join(done.stderr.split()) and not out.exists()


@pytest.mark.slow
def test_a_reduced_sweep_runs_end_to_end(tmp_path):
    """Two connectors, one seed, tiny data and model, a few steps: the real command writes both
    cells' intervals and the reports (no outcome is asserted)."""
    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    sizes = [w for k, v in TINY_DATA.items() for w in ("--data-size", f"{k}={v}")]
    cmd = [sys.executable, "-m", "vlmkit.cli", "ablate", str(recipe), "train.stages.instruct.max_steps=3",
           "--connectors", "mlp,pooling", "--seeds", "0", "--jobs", "2", *sizes, "--out", str(out)]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "ablation.json").read_text())
    assert [r["values"] for r in report["rows"]] == [{"connector": "mlp"}, {"connector": "pooling"}]
    for row in report["rows"]:
        for entry in row["accuracy"].values():
            lo, hi = entry["ci"]
            assert 0 <= lo <= entry["mean"] <= hi <= 1 and entry["items"] > 0
        assert row["visual_tokens"] > 0 and row["prefill_gflops"] > 0 and row["trainable_parameters"] > 0
    assert report["rows"][0]["visual_tokens"] == 4 * report["rows"][1]["visual_tokens"]  # 2x2 pooling
    assert (out / "ablation.md").read_text().count("\n| mlp |") == 1
    [compared] = report["comparisons"]
    assert compared["against"] == "connector=mlp" and compared["difference"]["overall"]["items"] == report["rows"][0]["overall"]["items"]
    assert "\n| pooling | " in (out / "ablation.md").read_text()
    assert (out / "accuracy_vs_tokens.png").stat().st_size > 0
    assert [c["train_cpu_seconds"] > 0 for c in report["cells"]] == [True, True]


def _spawned_children(pid: int) -> list[int]:
    """The multiprocessing-spawned processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
def test_a_sweep_stopped_by_sigterm_leaves_no_cell_training(tmp_path):
    """SIGTERM to the sweep's own process alone (not its group): its cell workers die with it
    instead of training on in the cell folders a rerun would use."""
    import signal
    import time

    recipe = tiny_recipe(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    sizes = [w for k, v in TINY_DATA.items() for w in ("--data-size", f"{k}={v}")]
    cmd = [sys.executable, "-m", "vlmkit.cli", "ablate", str(recipe), "train.stages.instruct.max_steps=100000",
           "--connectors", "mlp,pooling", "--jobs", "2", *sizes, "--out", str(tmp_path / "sweep")]
    sweep = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not list((tmp_path / "sweep" / "cells").glob("*/metrics.jsonl")) and time.monotonic() < deadline:
            assert sweep.poll() is None, "the sweep ended before its cells trained"
            time.sleep(0.5)
        workers = _spawned_children(sweep.pid)
        assert len(workers) == 2
        sweep.send_signal(signal.SIGTERM)
        sweep.wait(60)
        deadline = time.monotonic() + 30
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [w for w in workers if _running(w)] == []
    finally:
        for pid in [sweep.pid, *workers]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_the_command_names_every_bundle():
    from vlmkit.commands.models import BUNDLE_NAMES
    from vlmkit.train.sweep import ABLATION_CONNECTORS

    assert BUNDLE_NAMES.split(", ") == list(ABLATION_CONNECTORS)


def test_prompt_flops_grow_from_the_image_budget_by_the_question(tmp_path):
    from vlmkit.config import load_config
    from vlmkit.presets.budget import image_budget, recipe_costing, sequence_flops

    costing = recipe_costing(load_config(tiny_recipe(tmp_path)))
    image = image_budget(costing, 32, 32)
    alone = sequence_flops(costing, 32, 32, image.sequence_tokens)
    assert alone == image.flops  # the image's own tokens only: what `vlmkit tokens` says
    asked = sequence_flops(costing, 32, 32, image.sequence_tokens + 10)
    assert asked["llm_prefill"] > alone["llm_prefill"] and asked["vision"] == alone["vision"]
