"""Cohere2-Vision: the tile canvas equals transformers' `get_optimal_tiled_canvas` on every size
up to 8x the tile and several tile caps; export-then-import gives equal tensors (the projector
without its LayerNorm, the Cohere2 decoder without a logit scale, the image tokens in the
tokenizer); and the family recipe trains, answers odd-sized images and takes LoRA through the
command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from _cli import vlmkit
from cohere2_vision_folder import save_cohere2_vision, transformers_canvas
from PIL import Image

from vlmkit.checkpoint import load_checkpoint
from vlmkit.families.cohere2_vision.processor import Cohere2VisionTileProcessor
from vlmkit.hf.registry import export_hf, import_hf

torch.set_num_threads(1)


@pytest.mark.parametrize("max_patches", [1, 4, 12])
def test_canvas_matches_transformers(max_patches):
    proc = Cohere2VisionTileProcessor(image_size=32, patch_size=4, max_num=max_patches)
    canvas = transformers_canvas()
    for w in range(1, 257, 5):
        for h in range(1, 257, 7):
            assert proc.grid(w, h) == tuple(canvas((h, w), (32, 32), 1, max_patches)), (w, h)


def test_export_then_import_gives_equal_tensors(tmp_path):
    model, _ = load_checkpoint(import_hf(save_cohere2_vision(tmp_path / "src"), tmp_path / "vlmkit"))
    assert not hasattr(model.connector.layernorm, "weight") and float(getattr(model.llm.config, "logit_scale", 1.0)) == 1.0
    exported = export_hf(model, tmp_path / "hf")
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    assert again.config.processor == model.config.processor and again.config.image_token == model.config.image_token
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_recipe_trains_answers_odd_images_and_takes_lora(tmp_path):
    recipe = yaml.safe_load((Path(__file__).resolve().parents[3] / "recipes" / "families" / "cohere2-vision.yaml").read_text())
    recipe["train"]["stages"]["instruct"] |= {"data": "data/train.json", "max_steps": 3, "batch_size": 4}
    recipe["train"]["output_dir"] = "runs/base"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    vlmkit(tmp_path, "data", "synth-train", "data", "--n", "12", "--n-test", "2", "--n-video", "0")
    vlmkit(tmp_path, "train", "recipe.yaml")
    ckpt = tmp_path / "runs" / "base" / "checkpoints" / "instruct"
    for size in [(37, 111), (160, 40)]:
        Image.new("RGB", size, (200, 40, 40)).save(tmp_path / f"odd_{size[0]}x{size[1]}.png")
        answer = vlmkit(tmp_path, "chat", "--checkpoint", str(ckpt), "--image", f"odd_{size[0]}x{size[1]}.png", "What colour?",
                        "--max-new-tokens", "3")
        assert answer.stdout.endswith("\n")
    lora = {"model": {"init_from": str(ckpt)},
            "train": {"output_dir": "runs/lora", "max_length": 2048,
                      "stages": {"lora": {"data": "data/train.json", "trainable": ["llm"], "lr": 1e-3, "batch_size": 2, "max_steps": 2,
                                          "lora": {"parts": ["llm"], "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}}}}}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(lora))
    vlmkit(tmp_path, "train", "lora.yaml")
    trained = tmp_path / "runs" / "lora" / "checkpoints" / "lora"
    assert (trained / "adapters.safetensors").is_file()
    assert vlmkit(tmp_path, "chat", "--checkpoint", str(trained), "--image", "odd_37x111.png", "What?", "--max-new-tokens", "3").stdout
