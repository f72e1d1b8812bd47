"""`vlmkit export-hf --adapters peft`: a checkpoint with LoRA adapters (LLM and vision tower)
becomes the base model in its family's transformers format plus a PEFT adapter folder, named as
peft names it for that transformers model; `PeftModel.from_pretrained(transformers model,
folder)` gives vlmkit's unmerged logits, and merging the PEFT model gives the merged export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmkit.data.formats import Message
from vlmkit.hf.registry import import_hf
from vlmkit.processing import build_chat_processor
from vlmkit.model import lora
from vlmkit.checkpoint import load_checkpoint, save_checkpoint
from vlmkit.processing.base import VisualBatch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from paligemma_folder import save_paligemma  # noqa: E402
from qwen2_vl_folder import save_qwen2vl  # noqa: E402

torch.set_num_threads(1)
VLMKIT = [sys.executable, "-m", "vlmkit.cli"]


def _adapted_checkpoint(root: Path, family: str) -> Path:
    folder = save_qwen2vl(root / "hf") if family == "qwen2_vl" else save_paligemma(root / "hf")
    model, config = load_checkpoint(import_hf(folder, root / "vlmkit"))
    spec = {"parts": ["llm", "vision"], "r": 4, "alpha": 8, "dropout": 0.0, "quantize": None,
            "targets": ["q_proj", "v_proj", "down_proj", "qkv", "fc1"]}
    lora.add_adapters(model, spec)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # lora_B starts at zero: random adapters make the check meaningful
        for name, p in model.named_parameters():
            if ".lora_B." in name or ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return save_checkpoint(root / "adapted", model, config)


@pytest.mark.parametrize("family", ["qwen2_vl", "paligemma"])
def test_peft_export_loads_in_peft_with_vlmkits_unmerged_logits(tmp_path, family):
    from peft import PeftModel
    from safetensors import safe_open

    from vlmkit.hf.registry import family_for, family_of

    ckpt = _adapted_checkpoint(tmp_path, family)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(VLMKIT + ["export-hf", "--checkpoint", str(ckpt), str(tmp_path / "exported"), "--adapters", "peft"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "transformers + PEFT reload matches" in out.stdout
    folder = tmp_path / "exported"
    adapter = folder / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    llm_prefix = "base_model.model.model.language_model.layers.0."
    assert f"{llm_prefix}self_attn.q_proj.lora_A.weight" in keys and f"{llm_prefix}mlp.down_proj.lora_B.weight" in keys
    vision = "base_model.model.model.visual.blocks.0.attn.qkv" if family == "qwen2_vl" else \
        "base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj"
    assert any(k.startswith(vision) for k in keys), [k for k in keys if "language_model" not in k][:8]

    model, _ = load_checkpoint(ckpt, merge=False)
    assert lora.lora_layers(model.llm) and lora.lora_layers(model.vision)
    # The base folder holds the unmerged base weights: vlmkit's export of the merged model differs.
    image = Image.new("RGB", (40, 56), (200, 60, 30))
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>What colour?")], [image])
    ids = prompt.input_ids[None]
    extra = {"position_ids": prompt.position_ids[:, None]} if prompt.position_ids is not None else {}
    cls, kwargs = family_for(family_of(model)).reference(model, prompt, ids)
    ref = cls.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = ref(input_ids=ids, **kwargs).logits
        peft_model = PeftModel.from_pretrained(ref, adapter).eval()
        theirs = peft_model(input_ids=ids, **kwargs).logits
        ours = model(ids, visuals=VisualBatch(prompt.images), **extra).logits
        merged, _ = load_checkpoint(ckpt)
        ours_merged = merged(ids, visuals=VisualBatch(prompt.images), **extra).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours_merged, ours, atol=1e-4, rtol=0)
    assert (base_logits - ours).abs().max() > 1e-2  # the adapters change the model
    with torch.no_grad():
        folded = peft_model.merge_and_unload()(input_ids=ids, **kwargs).logits
    torch.testing.assert_close(folded, ours, atol=1e-4, rtol=0)


def test_peft_export_of_a_checkpoint_without_adapters_is_refused(tmp_path):
    from vlmkit.hf.folder import ExportError
    from vlmkit.hf.peft import export_hf_peft

    model, _ = load_checkpoint(import_hf(save_qwen2vl(tmp_path / "hf"), tmp_path / "vlmkit"), merge=False)
    with pytest.raises(ExportError, match="no LoRA adapters"):
        export_hf_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
