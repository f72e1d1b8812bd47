"""`loss: embed-align`: a stage that writes what an image shows into its visual tokens as the LLM's
own input embeddings, without running the LLM. The loss is checked against a direct computation
(special tokens and image-less samples left out, the decoder never called, only the connector
trained), and `vlmkit train` drives such a stage from data on disk, after which each held-out
image's visual tokens hold its answer's embedding rather than the other answer's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from vlmkit.config import load_config
from vlmkit.data.collate import collate
from vlmkit.data.formats import read_llava_json
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.processing import build_chat_processor
from vlmkit.checkpoint import load_checkpoint
from vlmkit.train.objectives import EmbedAlignObjective
from vlmkit.utils import read_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import TINY_SECTIONS  # noqa: E402

TINY = {**TINY_SECTIONS, "connector": {"name": "mlp", "output_norm": "text"}, "system_prompt": ""}
COLOURS = {"R": (220, 30, 30), "B": (30, 40, 220)}


def _colour_data(folder: Path, n: int, seed: int, with_text_only: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        name = list(COLOURS)[i % 2]
        pixels = torch.tensor(COLOURS[name], dtype=torch.float32)[None, None] + 25 * torch.randn(32, 32, 3, generator=g)
        Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": name}]})
    if with_text_only:
        records.append({"id": "text", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "RB"}]})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_loss_is_the_mean_best_cosine_gap_over_answer_tokens_without_the_llm(tmp_path):
    torch.manual_seed(0)
    model = VisionLanguageModel.build(load_config({"model": TINY}).model, pretrained=False)
    model.set_trainable(["connector"])
    processor = build_chat_processor(model, 128)
    samples = read_llava_json(_colour_data(tmp_path, 3, seed=0, with_text_only=True))
    batch = collate([processor.encode(s) for s in samples], 0)

    def no_decoder(*_):
        raise AssertionError("embed-align ran the LLM's decoder")

    model.llm.get_decoder().register_forward_pre_hook(no_decoder)
    objective = EmbedAlignObjective(model)
    loss_sum, counts = objective.loss(model, model, batch, None, {})

    # Directly: per sample with an image, every supervised non-special token's embedding against
    # that sample's own visual tokens.
    table = model.llm.get_input_embeddings().weight
    special = set(model.tokenizer.all_special_ids)
    expected, expected_counts = 0.0, []
    with torch.no_grad():
        tokens = model.image_tokens(batch.images)
    for i, sample in enumerate(samples):
        wanted = [t for t in batch.targets[i].tolist()
                  if t != -100 and t not in special and model.tokenizer.decode([t]).strip()]
        if not sample.images:
            expected_counts.append(0)
            continue
        visual = F.normalize(tokens[i].float(), dim=-1)
        expected_counts.append(len(wanted))
        for t in wanted:
            expected += 1 - float((F.normalize(table[t].float(), dim=-1) @ visual.T).max())
    assert counts.tolist() == expected_counts and expected_counts[-1] == 0 and all(expected_counts[:3])
    # The answer is one byte-level letter; end-of-turn and the newline after it are not targets.
    assert expected_counts[:3] == [1, 1, 1]
    assert loss_sum.item() == pytest.approx(expected, rel=1e-5)
    assert objective.local_normaliser([type("MB", (), {"batch": batch})()]) == sum(expected_counts)

    loss_sum.backward()
    with_grad = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"connector"}


def test_embed_align_stage_through_vlmkit_train_puts_the_answer_embedding_in_the_visual_tokens(tmp_path):
    _colour_data(tmp_path / "data", 16, seed=0)
    held_out = _colour_data(tmp_path / "held", 8, seed=1)
    recipe = {"model": TINY,
              "train": {"output_dir": "run", "max_length": 128, "seed": 0,
                        "stages": {"embed": {"data": "data/data.json", "loss": "embed-align", "trainable": ["connector"],
                                             "lr": 1e-2, "batch_size": 8, "max_steps": 30, "warmup_ratio": 0.0},
                                   "sft": {"data": "data/data.json", "trainable": ["connector"], "lr": 1e-3,
                                           "batch_size": 8, "max_steps": 2}}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "vlmkit.cli", "train", "recipe.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r.get("stage") == "embed" and "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.3 * sum(losses[:3]) / 3

    model, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "embed")
    processor = build_chat_processor(model, 128)
    table = F.normalize(model.llm.get_input_embeddings().weight, dim=-1)
    letter = {name: model.tokenizer.encode(name, add_special_tokens=False)[0] for name in COLOURS}
    for sample in read_llava_json(held_out):
        encoded = processor.encode(sample)
        with torch.no_grad():
            visual = F.normalize(model.image_tokens(encoded.images)[0], dim=-1)
        best = {name: (table[t] @ visual.T).max().item() for name, t in letter.items()}
        answer = sample.messages[-1].content
        assert best[answer] > 0.9 and best[answer] > max(v for k, v in best.items() if k != answer)
