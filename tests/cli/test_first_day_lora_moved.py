"""The first day, as a new user does it from an empty folder through the `vlmkit` command: import a
Hugging Face model, fine-tune it with LoRA (`model.init_from`), then move the imported folder away
(and the run with it): `chat --checkpoint` still answers, with the same words as before the move."""

from __future__ import annotations

import shutil

import yaml

from _cli import vlmkit

# The Qwen2-VL family's folder builder (tests/conftest.py puts its folder on the path).
from qwen2_vl_folder import save_qwen2vl


def test_lora_on_an_import_answers_after_the_import_is_moved_away(tmp_path):
    home = tmp_path / "first-day"
    home.mkdir()
    save_qwen2vl(tmp_path / "downloads" / "qwen2-vl-tiny")
    vlmkit(home, "data", "synth-train", "data", "--n", "8", "--n-test", "2", "--n-video", "0")
    vlmkit(home, "import-hf", str(tmp_path / "downloads" / "qwen2-vl-tiny"), "models/qwen")
    recipe = {"model": {"init_from": "models/qwen"},
              "train": {"output_dir": "runs/lora", "max_length": 2048,
                        "stages": {"lora": {"data": "data/train.json", "trainable": ["llm"], "lr": 1e-3, "batch_size": 4,
                                            "max_steps": 2, "lora": {"parts": ["llm"], "r": 4, "alpha": 8,
                                                                     "targets": ["q_proj", "v_proj"]}}}}}
    (home / "lora.yaml").write_text(yaml.safe_dump(recipe))
    vlmkit(home, "train", "lora.yaml")
    trained = home / "runs" / "lora" / "checkpoints" / "lora"
    image = next((home / "data").rglob("*.png"))
    ask = ["chat", "--image", str(image), "What is in the image?", "--max-new-tokens", "4"]
    before = vlmkit(home, ask[0], "--checkpoint", str(trained), *ask[1:]).stdout

    # The import moved away and deleted; the run moved to another folder.
    shutil.move(str(home / "models"), str(tmp_path / "old-models"))
    shutil.rmtree(tmp_path / "old-models")
    shutil.move(str(home / "runs"), str(tmp_path / "archive"))
    moved = tmp_path / "archive" / "lora" / "checkpoints" / "lora"
    after = vlmkit(tmp_path, ask[0], "--checkpoint", str(moved), *ask[1:])
    assert after.stdout == before and after.stdout.strip()
    assert "Traceback" not in after.stderr

    # What was carried, deleted too: the error names the part, where it was expected and what to do.
    shutil.rmtree(moved / "llm")
    failed = vlmkit(tmp_path, ask[0], "--checkpoint", str(moved), *ask[1:], ok=False)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    assert f"its language model (model.llm.path) is read from {(moved / 'llm').resolve()}, which does not exist" in failed.stderr
