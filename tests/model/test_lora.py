"""LoRA through peft on an imported Qwen2-VL: only adapter parameters get gradients, the base
weights do not move, a toy colour task is learnt, adapters are saved as safetensors, a SIGTERM'd
run resumes them to the same losses, and the merged export's logits equal the unmerged model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmkit.config import ConfigError, load_config
from vlmkit.data.formats import Message
from vlmkit.generate import GenerationConfig, generate
from vlmkit.hf.registry import export_hf, import_hf
from vlmkit.processing import build_chat_processor
from vlmkit.model import lora
from vlmkit.checkpoint import load_checkpoint
from vlmkit.train.loop import run_training
from vlmkit.processing.base import VisualBatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qwen2_vl_folder import save_qwen2vl  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
CHILD = ROOT / "tests" / "_train_child.py"
COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220)}
LORA = {"parts": ["llm"], "r": 8, "alpha": 16, "dropout": 0.0,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return import_hf(save_qwen2vl(root / "hf"), root / "vlmkit")


def _colour_data(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        name = list(COLOURS)[i % 2]
        w, h = (int(x) for x in torch.randint(24, 64, (2,), generator=g))
        Image.new("RGB", (w, h), COLOURS[name]).save(folder / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": name}]})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def _recipe(ckpt: Path, data: Path, out: Path, **stage) -> dict:
    return {"model": {"init_from": str(ckpt)},
            "train": {"output_dir": str(out), "max_length": 512, "seed": 0,
                      "stages": {"lora": {"data": str(data), "trainable": ["llm"], "lr": 1e-2, "batch_size": 8,
                                          "max_steps": 30, "warmup_ratio": 0.0, "lora": LORA, **stage}}}}


def _answers(model, data_dir: Path, n: int) -> float:
    proc = build_chat_processor(model, 512)
    right = 0
    for i in range(n):
        record = json.loads((data_dir / "data.json").read_text())[i]
        prompt = proc.encode_prompt([Message("user", "<image>Colour?")], [Image.open(data_dir / record["image"])])
        out = model.tokenizer.decode(generate(model, [prompt], GenerationConfig(max_new_tokens=4))[0], skip_special_tokens=True)
        right += out.strip() == record["conversations"][1]["value"]
    return right / n


def test_only_adapters_get_gradients(imported):
    model, _ = load_checkpoint(imported)
    model.set_trainable(["llm"])
    lora.add_adapters(model, LORA)
    model.train()
    proc = build_chat_processor(model, 512)
    sample = proc.encode_prompt([Message("user", "<image>Colour?")], [Image.new("RGB", (40, 30), COLOURS["red"])])
    out = model(sample.input_ids[None], visuals=VisualBatch(sample.images), position_ids=sample.position_ids[:, None],
                labels=sample.input_ids[None])
    out.loss.backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert len(with_grad) == 2 * 7 * 2  # A and B for 7 targets in each of 2 layers


def test_lora_learns_saves_adapters_and_merged_export_matches(imported, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    data = _colour_data(tmp_path / "data", 32, seed=0)
    held_out = _colour_data(tmp_path / "held", 8, seed=1).parent
    base, _ = load_checkpoint(imported)
    base_llm = {k: v.clone() for k, v in base.llm.state_dict().items()}
    config = load_config(_recipe(imported, data, tmp_path / "run"))
    model, (stage,) = run_training(config, progress=False)
    assert sum(stage.losses[-5:]) / 5 < 0.2 * sum(stage.losses[:3]) / 3
    model.eval()
    assert _answers(model, held_out, 8) == 1.0
    # The base weights did not move: the adapters hold the whole update.
    merged_free = lora.base_state(model.llm.state_dict())
    assert all(torch.equal(merged_free[k], v) for k, v in base_llm.items() if "rotary" not in k)

    saved = tmp_path / "run" / "checkpoints" / "lora"
    meta = json.loads((saved / "meta.json").read_text())
    assert meta["lora"] == {**LORA, "quantize": None} and "llm" not in meta["parts"]
    from safetensors import safe_open

    with safe_open(str(saved / lora.ADAPTERS), "pt") as f:
        assert all(".lora_" in k for k in f.keys()) and len(list(f.keys())) == 28
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        assert not any("lora" in k for k in f.keys())

    # Merged (what inference and export load) vs the unmerged trained model.
    merged, _ = load_checkpoint(saved)
    assert not lora.lora_layers(merged.llm)
    proc = build_chat_processor(model, 512)
    image = Image.new("RGB", (50, 30), COLOURS["blue"])
    prompt = proc.encode_prompt([Message("user", "<image>Colour?")], [image])
    args = (prompt.input_ids[None],)
    kw = {"visuals": VisualBatch(prompt.images), "position_ids": prompt.position_ids[:, None]}
    with torch.no_grad():
        unmerged = model(*args, **kw).logits
        torch.testing.assert_close(merged(*args, **kw).logits, unmerged, atol=1e-4, rtol=0)
    exported = export_hf(merged, tmp_path / "hf")
    ref = Qwen2VLForConditionalGeneration.from_pretrained(exported, local_files_only=True).eval()
    with torch.no_grad():
        theirs = ref(input_ids=prompt.input_ids[None], pixel_values=prompt.images[0].pixel_values,
                     image_grid_thw=torch.tensor([prompt.images[0].views[0].grid]),
                     mm_token_type_ids=(prompt.input_ids[None] == merged.image_token_id).int()).logits
    torch.testing.assert_close(theirs, unmerged, atol=1e-4, rtol=0)


def test_sigterm_and_resume_restore_the_adapters(imported, tmp_path):
    data = _colour_data(tmp_path / "data", 16, seed=0)
    full = _recipe(imported, data, tmp_path / "full", max_steps=6, batch_size=4)
    _, (ref,) = run_training(load_config(full), progress=False)
    cut = _recipe(imported, data, tmp_path / "cut", max_steps=6, batch_size=4)
    recipe = tmp_path / "cut.json"
    recipe.write_text(json.dumps(cut))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}

    def child(tag, *flags):
        return subprocess.run([sys.executable, str(CHILD), str(recipe), str(tmp_path / f"{tag}.json"), *flags],
                              capture_output=True, text=True, env=env, timeout=300)

    r = child("term", "term-at-log=3")
    assert r.returncode == 143, r.stderr[-2000:]
    last = tmp_path / "cut" / "checkpoints" / "lora-last"
    assert (last / lora.ADAPTERS).is_file()
    r = child("again")
    assert r.returncode == 0 and "resuming at step 3/6" in r.stdout, r.stderr[-2000:]
    assert json.loads((tmp_path / "again.json").read_text())["losses"]["lora"] == ref.losses


def test_lora_config_is_checked(imported, tmp_path):
    data = _colour_data(tmp_path / "data", 2, seed=0)
    with pytest.raises(ConfigError, match=r"lora.parts \['llm'\] are not in trainable"):
        load_config(_recipe(imported, data, tmp_path / "r", trainable=["connector"]))
    with pytest.raises(ConfigError, match="lora.parts"):
        load_config(_recipe(imported, data, tmp_path / "r", lora={**LORA, "parts": ["decoder"]}))


def test_qlora_trains_on_a_4bit_base_and_merges_into_the_full_precision_base(imported, tmp_path):
    data = _colour_data(tmp_path / "data", 32, seed=0)
    held_out = _colour_data(tmp_path / "held", 8, seed=1).parent
    qlora = {**LORA, "quantize": "4bit"}
    config = load_config(_recipe(imported, data, tmp_path / "q", lora=qlora))
    model, (stage,) = run_training(config, progress=False)
    # Every linear layer of the LLM is NF4 under its adapter; the LM head stays full precision.
    quantized = [n for n, m in model.llm.named_modules() if lora.is_quantized(m)]
    assert len(quantized) == 7 * 2 and all(n.endswith(".base_layer") for n in quantized)
    assert not lora.is_quantized(model.llm.get_output_embeddings())
    assert {p.dtype for n, p in model.llm.named_parameters() if "base_layer.weight" in n} == {torch.uint8}
    assert all(lora.is_lora_key(n) for n, p in model.llm.named_parameters() if p.requires_grad)
    assert sum(stage.losses[-5:]) / 5 < 0.2 * sum(stage.losses[:3]) / 3
    proc = build_chat_processor(model, 512)
    prompt = proc.encode_prompt([Message("user", "<image>Colour?")], [Image.new("RGB", (50, 30), COLOURS["blue"])])
    args, kw = (prompt.input_ids[None],), {"visuals": VisualBatch(prompt.images), "position_ids": prompt.position_ids[:, None]}
    with torch.no_grad():
        trained = model.eval()(*args, **kw).logits
    assert _answers(model, held_out, 8) == 1.0
    # An eval-mode pass leaves the 4-bit layers as training reads them (bitsandbytes would repack
    # them for its CPU bf16 kernel, after which a training step computes garbage).
    model.train()
    out = model(*args, **kw, labels=prompt.input_ids[None])
    out.loss.backward()
    torch.testing.assert_close(out.logits.detach(), trained, atol=1e-5, rtol=0)
    model.zero_grad()

    saved = tmp_path / "q" / "checkpoints" / "lora"
    meta = json.loads((saved / "meta.json").read_text())
    assert meta["lora"]["quantize"] == "4bit" and "llm" not in meta["parts"]

    # Resuming rebuilds the same 4-bit base (quantization is deterministic) under the saved adapters.
    from vlmkit.model.vlm import VisionLanguageModel
    from vlmkit.checkpoint import load_weights
    from vlmkit.train.stages import apply_stage

    resumed = VisionLanguageModel.build(config.model)
    from vlmkit.checkpoint import init_from_checkpoint

    init_from_checkpoint(resumed, config.model.init_from)
    apply_stage(resumed, config.train.stages["lora"])
    load_weights(resumed, saved)
    with torch.no_grad():
        torch.testing.assert_close(resumed.eval()(*args, **kw).logits, trained, atol=0, rtol=0)

    # Inference loads the full-precision base with the adapters merged: no 4-bit layer is left,
    # the answers hold, and the logits differ from training's only by the base's quantization error.
    merged, _ = load_checkpoint(saved)
    assert not lora.lora_layers(merged.llm) and not any(lora.is_quantized(m) for m in merged.llm.modules())
    assert _answers(merged, held_out, 8) == 1.0
    with torch.no_grad():
        full = merged(*args, **kw).logits
    assert torch.equal(full[0, -1].argmax(), trained[0, -1].argmax())
    print("full-precision merge vs 4-bit training:", (full - trained).abs().max().item(), trained.abs().max().item())
    assert (full - trained).abs().max() < 0.2 * trained.abs().max()

    # Merging in memory folds each adapter into the dequantized weights it trained against.
    lora.merge_adapters(model)
    assert not any(lora.is_quantized(m) for m in model.llm.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(*args, **kw).logits, trained, atol=1e-4, rtol=0)


def test_qlora_is_refused_where_bitsandbytes_cannot_quantize(imported, tmp_path, monkeypatch):
    import importlib.util

    spec = {**LORA, "quantize": "4bit"}
    with pytest.raises(ValueError, match=r"QLoRA.*cannot run: the training device is 'mps'; bitsandbytes quantizes on cuda and cpu only"):
        lora.check_quantization(spec, "mps")
    lora.check_quantization({**LORA, "quantize": None}, "mps")  # plain LoRA runs anywhere
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    data = _colour_data(tmp_path / "data", 4, seed=0)
    config = load_config(_recipe(imported, data, tmp_path / "q", lora=spec))
    with pytest.raises(ValueError, match=r"QLoRA.*bitsandbytes is not installed.*Drop `quantize` to train plain LoRA"):
        run_training(config, progress=False)
