"""A new user's first day, seeing what training learned: from an empty folder, their own colour
data and a held-out file, `vlmkit train` with `train.report_to: [tensorboard]` prints each
stage's held-out score, draws `loss.png` and `heldout.png` per stage and writes TensorBoard event
files; a misspelt reporter is refused with the close match; SIGTERM is acknowledged at once.

Every step runs the real command in a subprocess (a tiny random model stands in for the packaged
parts), and no step may print a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests._tiny import tiny_config
from _cli import SRC, vlmkit
from tests.cli.test_cli_first_hour import COLOURS, write_dataset
from vlmkit.utils import read_jsonl


def write_heldout(folder: Path, n: int = 8) -> None:
    """n squares the training data never showed (other sizes and places), with their answers."""
    (folder / "heldout").mkdir()
    records = []
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        image = Image.new("RGB", (48, 40), (255, 255, 255))
        image.paste(COLOURS[name], (14 + i % 3, 10, 40, 34))
        image.save(folder / "heldout" / f"{i}.png")
        records.append({"id": f"h{i}", "image": f"heldout/{i}.png", "answer": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": name}]})
    (folder / "heldout.json").write_text(json.dumps(records, indent=1))


def write_recipe(project: Path, output_dir: str, stages: dict, **train) -> Path:
    tree = {"model": tiny_config("mlp").model_dump(mode="json", exclude_none=True),
            "train": {"output_dir": output_dir, "stages": stages, **train}}
    path = project / f"{Path(output_dir).name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("first-day")
    write_dataset(home / "my-project")
    write_heldout(home / "my-project")
    return home


@pytest.fixture(scope="module")
def reported(home):
    """A two-stage run with held-out checks, reporting to TensorBoard."""
    pytest.importorskip("tensorboard")
    stage = {"data": "train.json", "batch_size": 4, "lr": 3e-3}
    write_recipe(home / "my-project", "runs/report", {
        "align": {**stage, "trainable": ["connector"], "max_steps": 2},
        "sft": {**stage, "trainable": ["connector", "llm"], "max_steps": 3},
    }, report_to=["tensorboard"], eval={"benchmark": "synth-media", "data": "heldout.json", "every": 2, "max_new_tokens": 4})
    run = vlmkit(home, "train", "my-project/report.yaml")
    return home / "runs" / "report", run.stdout


def test_stage_summary_prints_the_heldout_score(reported):
    out, stdout = reported
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "eval"]
    for name, steps in (("align", 2), ("sft", 3)):
        last = [e for e in evals if e["stage"] == name][-1]
        assert last["step"] == steps
        assert f"stage {name}: {steps} steps, final loss" in stdout
        assert f"held-out synth-media {last['overall']:.1%} (8 items" in stdout, stdout


def test_each_stage_has_its_loss_and_heldout_plots(reported):
    out, stdout = reported
    for name in ("align", "sft"):
        assert f"stage {name}: curves runs/report/checkpoints/{name}/loss.png, runs/report/checkpoints/{name}/heldout.png" in stdout
        folder = out / "checkpoints" / name
        pngs = [folder / "loss.png", folder / "heldout.png"]
        for png in pngs:
            with Image.open(png) as image:
                image.verify()
                assert image.format == "PNG"


def test_report_to_tensorboard_writes_the_metrics_as_event_files(reported):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = reported
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    lines = read_jsonl(out / "metrics.jsonl")
    for name in ("align", "sft"):
        losses = {r["step"]: r["loss"] for r in lines if r.get("stage") == name and "loss" in r}
        assert {e.step: e.value for e in acc.Scalars(f"{name}/loss")} == pytest.approx(losses, rel=1e-6)
        heldout = {r["step"]: r["overall"] for r in lines if r.get("stage") == name and r.get("event") == "eval"}
        assert {e.step: e.value for e in acc.Scalars(f"{name}/heldout/overall")} == pytest.approx(heldout, abs=1e-7)


def test_a_misspelt_reporter_is_refused_with_the_close_match(home, reported):
    for args in (("recipe", "--check"), ("train",)):
        r = vlmkit(home, *args, "my-project/report.yaml", "train.report_to=[tensorbord]", ok=False)
        assert r.returncode == 2
        assert "train.report_to" in r.stderr and "did you mean 'tensorboard'?" in r.stderr, r.stderr


def test_sigterm_is_acknowledged_before_the_step_ends(home):
    # Steps of 24 micro-batches each take a few seconds: long enough to see the notice come
    # while one is under way.
    write_recipe(home / "my-project", "runs/term", {"sft": {"data": "train.json", "batch_size": 4, "grad_accum": 24, "lr": 3e-3,
                                                           "trainable": ["connector", "llm"], "max_steps": 4}})
    metrics = home / "runs" / "term" / "metrics.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vlmkit.cli", "train", "my-project/term.yaml"], cwd=home, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    notice: dict = {}
    stderr: list[str] = []

    def read_stderr():
        for line in proc.stderr:
            stderr.append(line)
            if "SIGTERM received" in line and not notice:
                # What the run had logged when the notice came: the step under way is not in it.
                notice["steps_logged"] = len(read_jsonl(metrics))
    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and read_jsonl(metrics)):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(stderr)
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # step 1 is logged: step 2 has just begun
        proc.wait(timeout=300)
        stdout = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    assert proc.returncode == 143, "".join(stderr)
    assert "Traceback" not in "".join(stderr)
    assert notice == {"steps_logged": 1}, "".join(stderr)
    assert "[vlmkit] SIGTERM received: saving a checkpoint after the current step ends" in "".join(stderr)
    assert "SIGTERM received; saved step 2 to sft-last, exiting" in stdout
