"""The first day, as a new user does it from an empty folder through the `vlmkit` command: import a
Hugging Face model, fine-tune it with LoRA (`model.init_from`), then move the imported folder away
(and the run with it): `chat --checkpoint` still answers, with the same words as before the move."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
# The Qwen2-VL family's folder builder (tests/conftest.py puts its folder on the path).
from qwen2_vl_folder import save_qwen2vl

VLMKIT = [sys.executable, "-m", "vlmkit.cli"]


def vlmkit(args: list[str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(VLMKIT + args, cwd=cwd, env=env, check=False, capture_output=True, text=True, timeout=600)
    if ok:
        assert out.returncode == 0, f"vlmkit {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


def test_lora_on_an_import_answers_after_the_import_is_moved_away(tmp_path):
    home = tmp_path / "first-day"
    home.mkdir()
    save_qwen2vl(tmp_path / "downloads" / "qwen2-vl-tiny")
    vlmkit(["data", "synth-train", "data", "--n", "8", "--n-test", "2", "--n-video", "0"], home)
    vlmkit(["import-hf", str(tmp_path / "downloads" / "qwen2-vl-tiny"), "models/qwen"], home)
    recipe = {"model": {"init_from": "models/qwen"},
              "train": {"output_dir": "runs/lora", "max_length": 2048,
                        "stages": {"lora": {"data": "data/train.json", "trainable": ["llm"], "lr": 1e-3, "batch_size": 4,
                                            "max_steps": 2, "lora": {"parts": ["llm"], "r": 4, "alpha": 8,
                                                                     "targets": ["q_proj", "v_proj"]}}}}}
    (home / "lora.yaml").write_text(yaml.safe_dump(recipe))
    vlmkit(["train", "lora.yaml"], home)
    trained = home / "runs" / "lora" / "checkpoints" / "lora"
    image = next((home / "data").rglob("*.png"))
    ask = ["chat", "--image", str(image), "What is in the image?", "--max-new-tokens", "4"]
    before = vlmkit([ask[0], "--checkpoint", str(trained), *ask[1:]], home).stdout

    # The import moved away and deleted; the run moved to another folder.
    shutil.move(str(home / "models"), str(tmp_path / "old-models"))
    shutil.rmtree(tmp_path / "old-models")
    shutil.move(str(home / "runs"), str(tmp_path / "archive"))
    moved = tmp_path / "archive" / "lora" / "checkpoints" / "lora"
    after = vlmkit([ask[0], "--checkpoint", str(moved), *ask[1:]], tmp_path)
    assert after.stdout == before and after.stdout.strip()
    assert "Traceback" not in after.stderr

    # What was carried, deleted too: the error names the part, where it was expected and what to do.
    shutil.rmtree(moved / "llm")
    failed = vlmkit([ask[0], "--checkpoint", str(moved), *ask[1:]], tmp_path, ok=False)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    assert f"its language model (model.llm.path) is read from {(moved / 'llm').resolve()}, which does not exist" in failed.stderr
