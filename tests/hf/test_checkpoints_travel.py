"""Checkpoints that travel: a checkpoint trained from an import (`model.init_from: OUT`), LoRA or
full, carries the import's `llm/` folder and records it relative to itself, so it loads with the
same logits after the import is moved or deleted and after the checkpoint itself is moved. A part
that is gone is named with where it was expected and what to do; old checkpoints that name the
import by absolute path still load while it is there. `export-hf` says how to load what it wrote."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from llava_next_folder import save_llava_next
from PIL import Image
from qwen2_vl_folder import save_qwen2vl
from typer.testing import CliRunner

from vlmkit.checkpoint import load_checkpoint
from vlmkit.config import ConfigError, load_config
from vlmkit.data.formats import Message
from vlmkit.hf.registry import import_hf
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch
from vlmkit.train.loop import run_training

torch.set_num_threads(1)
LORA = {"parts": ["llm"], "r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
# The families' tiny folder builders (tests/conftest.py puts their folders on the path).
FOLDERS = {"qwen2-vl": save_qwen2vl, "llava-next": save_llava_next}


def _data(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (name, rgb) in enumerate([("red", (220, 30, 30)), ("blue", (30, 40, 220))] * 2):
        Image.new("RGB", (40 + 8 * i, 32), rgb).save(folder / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": name}]})
    (folder / "data.json").write_text(json.dumps(records))
    return folder / "data.json"


def _train(imported: Path, data: Path, out: Path, lora: bool) -> Path:
    stage = {"data": str(data), "trainable": ["llm"] if lora else ["connector", "llm"], "lr": 1e-2, "batch_size": 2,
             "max_steps": 2, "warmup_ratio": 0.0, **({"lora": LORA} if lora else {})}
    config = load_config({"model": {"init_from": str(imported)},
                          "train": {"output_dir": str(out), "max_length": 512, "seed": 0, "stages": {"ft": stage}}})
    run_training(config, progress=False)
    return out / "checkpoints" / "ft"


@torch.no_grad()
def _logits(checkpoint: Path) -> torch.Tensor:
    model, _ = load_checkpoint(checkpoint)
    prompt = build_chat_processor(model, 512).encode_prompt([Message("user", "<image>Colour?")], [Image.new("RGB", (48, 40), (200, 90, 20))])
    extra = {"position_ids": prompt.position_ids[:, None]} if prompt.position_ids is not None else {}
    return model(prompt.input_ids[None], VisualBatch(prompt.images), **extra).logits


@pytest.mark.parametrize(("family", "lora"), [("qwen2-vl", True), ("qwen2-vl", False), ("llava-next", True)])
def test_trained_checkpoint_loads_after_the_import_and_itself_move(tmp_path, family, lora):
    imported = import_hf(FOLDERS[family](tmp_path / "hf"), tmp_path / "imports" / "base")
    # The import records its own llm/ relative to itself.
    assert json.loads((imported / "config.json").read_text())["model"]["llm"]["path"] == "llm"
    trained = _train(imported, _data(tmp_path / "data"), tmp_path / "run", lora)
    saved = json.loads((trained / "config.json").read_text())
    assert saved["model"]["llm"]["path"] == "llm"
    assert json.loads((trained / "meta.json").read_text())["carried"] == {"llm": str((imported / "llm").resolve())}
    # Hard links on one file system: carrying the LLM costs no disk.
    weights = next(p.name for p in (imported / "llm").glob("*.safetensors"))
    assert (trained / "llm" / weights).stat().st_ino == (imported / "llm" / weights).stat().st_ino
    before = _logits(trained)
    # The same run again reuses the stage: the carried folder compares as the one it came from.
    meta = json.loads((trained / "meta.json").read_text())
    _train(imported, tmp_path / "data" / "data.json", tmp_path / "run", lora)
    assert json.loads((trained / "meta.json").read_text())["id"] == meta["id"]

    # The import moved away, then deleted; the trained checkpoint moved to another folder.
    shutil.move(str(imported), str(tmp_path / "elsewhere"))
    shutil.rmtree(tmp_path / "elsewhere")
    moved = tmp_path / "other" / "place" / "ft"
    moved.parent.mkdir(parents=True)
    shutil.move(str(trained), str(moved))
    _, config = load_checkpoint(moved)
    assert config.model.llm.path == str((moved / "llm").resolve())
    torch.testing.assert_close(_logits(moved), before, atol=0, rtol=0)

    # A checkpoint trained on top of the moved one carries the folder on again.
    again = _train(moved, tmp_path / "data" / "data.json", tmp_path / "run2", lora=False)
    shutil.move(str(moved.parent), str(tmp_path / "gone"))
    shutil.rmtree(tmp_path / "gone")
    assert _logits(again).shape == before.shape


def test_missing_part_names_the_part_the_path_and_what_to_do(tmp_path):
    hf = save_qwen2vl(tmp_path / "hf")
    imported = import_hf(hf, tmp_path / "base")
    trained = _train(imported, _data(tmp_path / "data"), tmp_path / "run", lora=True)

    # An old checkpoint (written before parts were carried) names the import's llm/ by absolute path.
    old = tmp_path / "old"
    shutil.copytree(trained, old)
    shutil.rmtree(old / "llm")
    cfg = json.loads((old / "config.json").read_text())
    cfg["model"]["llm"]["path"] = str((imported / "llm").resolve())
    (old / "config.json").write_text(json.dumps(cfg))
    before = _logits(old)  # still loads while the import is there
    torch.testing.assert_close(before, _logits(trained), atol=0, rtol=0)

    shutil.move(str(imported), str(tmp_path / "moved-base"))
    with pytest.raises(FileNotFoundError) as err:
        load_checkpoint(old)
    message = str(err.value)
    gone = (tmp_path / "base" / "llm").resolve()
    assert f"checkpoint {old.resolve()}: its language model (model.llm.path) is read from {gone}, which does not exist" in message
    assert f"Move the folder back to {gone}" in message and f"vlmkit import-hf <the Hugging Face folder> {gone.parent}" in message
    assert "holds no config.json" not in message

    # The import's own llm/ deleted: re-import from the folder it came from.
    moved_base = tmp_path / "moved-base"
    shutil.rmtree(moved_base / "llm")
    with pytest.raises(FileNotFoundError, match=rf"vlmkit import-hf {hf.resolve()} {moved_base.resolve()}`"):
        load_checkpoint(moved_base)
    # ... and `model.init_from` on it says so before anything is built.
    with pytest.raises(ConfigError, match=r"model.init_from \(dict\): the checkpoint .*its language model .*does not exist"):
        load_config({"model": {"init_from": str(moved_base)}})

    # A folder that is there but is no model folder.
    (moved_base / "llm").mkdir()
    with pytest.raises(FileNotFoundError, match=r"which holds no config.json, so it is not a model folder"):
        load_checkpoint(moved_base)

    # A trained checkpoint whose carried folder was deleted: copy the import's back into it.
    shutil.rmtree(trained / "llm")
    with pytest.raises(FileNotFoundError, match=r"copy the `llm` folder of the imported checkpoint"):
        load_checkpoint(trained)


def test_a_recipe_naming_a_missing_llm_folder_says_so(tmp_path):
    from vlmkit.model.vlm import VisionLanguageModel

    config = load_config({"model": {"llm": {"name": "hf", "path": str(tmp_path / "nowhere")}}})
    with pytest.raises(FileNotFoundError, match=r"model.llm.path: the language model folder .*nowhere does not exist"):
        VisionLanguageModel.build(config.model)


def _python_lines(block: str) -> str:
    """The indented lines under a heading of export-hf's message, as a Python script."""
    return "\n".join(line[2:] for line in block.splitlines()[1:] if line.startswith("  "))


@pytest.mark.parametrize("family", ["qwen2-vl", "llava-next"])
def test_export_hf_prints_how_to_load_it(tmp_path, family):
    import subprocess

    from vlmkit.cli import app

    imported = import_hf(FOLDERS[family](tmp_path / "hf"), tmp_path / "base")
    out = tmp_path / "exported"
    result = CliRunner().invoke(app, ["export-hf", "--checkpoint", str(imported), str(out), "--no-check"])
    assert result.exit_code == 0, result.output
    text = result.output
    model_class = {"qwen2-vl": "Qwen2VLForConditionalGeneration", "llava-next": "LlavaNextForConditionalGeneration"}[family]
    assert f"from transformers import AutoProcessor, {model_class}" in text
    assert f'model = {model_class}.from_pretrained("{out}")' in text
    assert f'processor = AutoProcessor.from_pretrained("{out}")' in text
    with_tv, _, without_tv = text.partition("without torchvision")
    if family == "llava-next":  # its processor needs no torchvision: nothing more to say
        assert not without_tv
        script = _python_lines(with_tv.split("load it with transformers:")[1])
        checks = f"assert type(model).__name__ == {model_class!r}; assert type(processor).__name__ == 'LlavaNextProcessor'"
    else:
        assert "(Qwen2VLProcessor needs it; pip install torchvision)" in without_tv
        assert "Qwen2VLImageProcessorPil" in without_tv and f"vlmkit serve --checkpoint {imported}" in without_tv
        # The model line, then the torchvision-free lines, run as printed.
        model_line = next(line for line in with_tv.splitlines() if "model = " in line)
        script = f"from transformers import {model_class}\n{model_line.strip()}\n" + _python_lines(without_tv)
        checks = "assert type(image_processor).__name__ == 'Qwen2VLImageProcessorPil'; assert tokenizer('<|image_pad|>').input_ids"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ran = subprocess.run([sys.executable, "-c", script + "\n" + checks], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
