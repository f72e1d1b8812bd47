"""Imported PaliGemma and Gemma 3 folders through the `vlmkit` command: `import-hf`, `chat` on
odd image sizes, and `train` with `model.init_from` and a LoRA stage (the prefix-LM / image
attention rules in the training forward), then `chat` on its result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from gemma3_folder import save_gemma3
from paligemma_folder import save_paligemma
from PIL import Image

REPO = Path(__file__).resolve().parents[3]

VLMKIT = [sys.executable, "-m", "vlmkit.cli"]
torch.set_num_threads(1)


def run(args, cwd, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(VLMKIT + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"vlmkit {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


@pytest.mark.parametrize("family", ["paligemma", "gemma3"])
def test_imported_gemma_family_chats_and_trains_lora_from_the_command_line(tmp_path, family):
    folder = (save_paligemma if family == "paligemma" else save_gemma3)(tmp_path / "hf")
    run(["import-hf", str(folder), "ckpt"], tmp_path)
    ckpt = tmp_path / "ckpt"
    for size in [(37, 111), (160, 40)]:
        Image.new("RGB", size, (200, 40, 40)).save(tmp_path / f"odd_{size[0]}x{size[1]}.png")
        answer = run(["chat", "--checkpoint", str(ckpt), "--image", f"odd_{size[0]}x{size[1]}.png", "What colour?",
                      "--max-new-tokens", "4"], tmp_path)
        assert "Traceback" not in answer.stderr

    records = []
    for i, (name, colour) in enumerate([("red", (220, 30, 30)), ("blue", (30, 40, 220))] * 2):
        Image.new("RGB", (30 + 7 * i, 40), colour).save(tmp_path / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": name}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    recipe = {"model": {"init_from": "ckpt"},
              "train": {"output_dir": "runs/lora", "max_length": 512, "seed": 0,
                        "stages": {"lora": {"data": "data.json", "trainable": ["llm"], "lr": 1e-2, "batch_size": 4, "max_steps": 3,
                                            "warmup_ratio": 0.0, "lora": {"parts": ["llm"], "r": 4, "alpha": 8, "dropout": 0.0,
                                                                          "targets": ["q_proj", "v_proj"]}}}}}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(recipe))
    run(["train", "lora.yaml"], tmp_path)
    trained = tmp_path / "runs" / "lora" / "checkpoints" / "lora"
    assert (trained / "adapters.safetensors").is_file()
    answer = run(["chat", "--checkpoint", str(trained), "--image", "odd_37x111.png", "Colour?", "--max-new-tokens", "3"], tmp_path)
    assert "Traceback" not in answer.stderr
