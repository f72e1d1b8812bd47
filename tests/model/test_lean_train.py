"""The lean training forward (`model/lean_train.py`) on imported Qwen2-VL and LLaVA-NeXT with
LoRA: the SFT loss as `vlmkit train` computes it (`decoder_rows`, answer positions only) equals
transformers + peft's loss on the same folder with the same adapters, and so do the adapters'
gradients; the rows equal the ordinary forward's hidden states at those positions. The batch has
answers of different lengths, so rows are right-padded."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "families" / "qwen2_vl"), str(HERE.parent / "families" / "llava_next")]

LORA = {"parts": ["llm"], "r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]}
ANSWERS = ["A red square.", "Noise, nothing else at all.", "Blue."]


def _png(seed: int, size=(56, 42)) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    png = io.BytesIO()
    Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()).save(png, format="PNG")
    return png.getvalue()


def _adapters(module) -> dict:
    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            m = re.search(r"layers\.(\d+)\..*\.(\w+_proj)\.lora_([AB])\.", name)
            assert m is not None, name
            out[m.groups()] = p
    return out


def _models(family: str, root: Path):
    from vlmkit.checkpoint import load_checkpoint
    from vlmkit.hf.registry import import_hf

    if family == "qwen2-vl":
        from qwen2_vl_folder import save_qwen2vl
        from transformers import Qwen2VLForConditionalGeneration as cls

        folder = save_qwen2vl(root / "hf")
    else:
        from llava_next_folder import save_llava_next
        from transformers import LlavaNextForConditionalGeneration as cls

        folder = save_llava_next(root / "hf")
    model, _ = load_checkpoint(import_hf(folder, root / "vlmkit"))
    return model, cls.from_pretrained(folder, local_files_only=True, dtype=torch.float32)


def _hf_inputs(family: str, model, encoded, b) -> dict:
    from vlmkit.families.llava_next.hf import llava_next_inputs

    if family == "llava-next":
        return llava_next_inputs(encoded, pad_id=model.tokenizer.pad_token_id)
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask,
            "pixel_values": torch.cat([e.images[0].pixel_values for e in encoded]),
            "image_grid_thw": torch.tensor([e.images[0].views[0].grid for e in encoded]),
            "mm_token_type_ids": (b.input_ids == model.image_token_id).int()}


@pytest.mark.parametrize("family", ["qwen2-vl", "llava-next"])
def test_lean_sft_loss_and_adapter_grads_equal_transformers_peft(tmp_path, family):
    from peft import LoraConfig, get_peft_model

    from vlmkit.core.types import IGNORE_INDEX, Message, Sample
    from vlmkit.data.collate import collate
    from vlmkit.model import lora
    from vlmkit.model.lean_train import lean_decoder
    from vlmkit.model.vlm import lm_head
    from vlmkit.processing import build_chat_processor
    from vlmkit.train.losses import decoder_hidden, decoder_rows, sequence_logps, sft_loss_sum, step_normaliser

    torch.manual_seed(0)
    model, ref = _models(family, tmp_path)
    proc = build_chat_processor(model, 4096)
    encoded = [proc.encode(Sample(f"s{i}", [Message("user", "<image>\nWhat is it?"), Message("assistant", a)], [_png(i)]))
               for i, a in enumerate(ANSWERS)]
    b = collate(encoded, pad_id=model.tokenizer.pad_token_id)
    assert not bool(b.attention_mask.all())  # right padding
    model.set_trainable(["llm"])
    lora.add_adapters(model, LORA)
    model.train()
    ours = _adapters(model)
    with torch.no_grad():  # random B (peft starts it at zero) so that A's gradients are not zero
        for key, p in ours.items():
            if key[2] == "B":
                p.normal_(0, 0.05)
    targets = r".*language_model.*\.(" + "|".join(LORA["targets"]) + ")"
    peft_model = get_peft_model(ref, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=targets))
    peft_model.train()
    theirs = _adapters(peft_model)
    assert sorted(theirs) == sorted(ours)
    with torch.no_grad():
        for key, p in theirs.items():
            p.copy_(ours[key])

    assert lean_decoder(model.llm.base_model, b.attention_mask, b.position_ids)
    head = lm_head(model.llm)
    rows = decoder_rows(model, b)
    logps, counts = sequence_logps(rows, b, head)
    loss = sft_loss_sum(logps, counts, "token") / step_normaliser(counts, "token")
    loss.backward()
    hf_loss = peft_model(**_hf_inputs(family, model, encoded, b), labels=b.labels).loss
    hf_loss.backward()

    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-6)
    for key in ours:
        torch.testing.assert_close(ours[key].grad, theirs[key].grad, rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    with torch.no_grad():  # the rows are the ordinary forward's hidden states at the targets
        full = decoder_hidden(model, b)[b.targets != IGNORE_INDEX]
    torch.testing.assert_close(rows.detach(), full, rtol=1e-5, atol=1e-5)


def test_unsupported_decoders_take_the_ordinary_path(tmp_path):
    """Hooks on a layer (DeepStack's injections) or gradient checkpointing: not the lean path."""
    from vlmkit.model.lean_train import lean_decoder

    model, _ = _models("qwen2-vl", tmp_path)
    decoder = model.llm.base_model
    mask = torch.ones(1, 4, dtype=torch.long)
    positions = torch.zeros(3, 1, 4, dtype=torch.long)
    assert lean_decoder(decoder, mask, positions)
    assert not lean_decoder(decoder, None, positions)  # packed rows
    assert not lean_decoder(decoder, mask, torch.zeros(4, 1, 4, dtype=torch.long))  # packed M-RoPE positions
    handle = decoder.layers[0].register_forward_hook(lambda *a: None)
    assert not lean_decoder(decoder, mask, positions)
    handle.remove()
    decoder.gradient_checkpointing = True
    assert not lean_decoder(decoder, mask, positions)


def test_clip_tower_read_at_an_earlier_layer_runs_only_the_layers_up_to_it():
    """LLaVA's `feature_layer: -2`: the same features as transformers' `hidden_states[-2]`,
    without running the last layer; a foreign hook on the tower
    sends it back through the model's own forward."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from vlmkit.model.vision import HFVisionTower

    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                            image_size=28, patch_size=14)).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        states = clip(pixel_values=x, output_hidden_states=True).hidden_states
    for layer in (-2, -3):
        tower = HFVisionTower(clip, layer)
        assert tower._runs_layers_itself()
        with torch.no_grad():
            torch.testing.assert_close(tower(x), states[layer][:, 1:], rtol=0, atol=0)
    calls = []
    handle = clip.encoder.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    tower = HFVisionTower(clip, -2)
    assert not tower._runs_layers_itself()
    with torch.no_grad():
        torch.testing.assert_close(tower(x), states[-2][:, 1:], rtol=0, atol=0)
    assert calls  # the ordinary forward ran every layer
    handle.remove()
