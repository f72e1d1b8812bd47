"""Hugging Face LLaVA-1.5 export/import: transformers loads the export as LlavaForConditionalGeneration
with the same logits, preprocessing, prompt and greedy output; an import is trainable in vlmkit.
Import of a transformers-saved folder against transformers (ids, pixels, logits, greedy tokens):
tests/families/test_hf_parity.py."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmkit.config import load_config
from vlmkit.data.formats import Message
from vlmkit.families.llava.hf import check_exportable, export_llava, import_llava, verify_export
from vlmkit.generate import GenerationConfig, generate
from vlmkit.hf.folder import ExportError
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch

LLM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512}
SIGLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}


# Pad colours: LLaVA truncates mean * 255, vlmkit's fixed processor rounds; these means agree under both.
def build(vision: dict, connector_options: dict | None = None, processor: dict | None = None, seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    cfg = load_config({"model": {
        "vision": vision,
        "connector": {"name": "mlp", "options": connector_options or {}},
        "llm": {"name": "hf-random", "config": LLM},
        "processor": {"image_size": 32, "mean": [0.4, 0.3, 0.2], "std": [0.2, 0.3, 0.25], **(processor or {})},
    }})
    model = VisionLanguageModel.build(cfg.model, pretrained=False).eval()
    # Random init leaves the LM near-uniform; sharper logits make greedy comparisons meaningful.
    with torch.no_grad():
        model.llm.get_output_embeddings().weight.mul_(8)
    return model


def siglip_model(**kw):
    return build({"name": "hf-random", "model_type": "siglip_vision_model", "config": SIGLIP}, **kw)


def test_export_loads_as_llava_with_equal_logits_prompt_pixels_and_greedy_output(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = siglip_model()
    assert model.image_token_id >= model.vocab_size  # the case that needs the vocabulary grown
    out = export_llava(model, tmp_path / "llava")
    assert verify_export(model, out) < 1e-4

    llava = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    hf_proc = AutoProcessor.from_pretrained(out, local_files_only=True)
    image = Image.new("RGB", (50, 30), (180, 60, 20))
    image.putpixel((3, 4), (0, 255, 0))
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = hf_proc.apply_chat_template(conversation, add_generation_prompt=True)
    hf_inputs = hf_proc(images=image, text=text, return_tensors="pt")

    ours = build_chat_processor(model, 256).encode_prompt([Message("user", "<image>\nWhat is shown?")], [image])
    assert hf_inputs["input_ids"][0].tolist() == ours.input_ids.tolist()
    torch.testing.assert_close(hf_inputs["pixel_values"], ours.images[0].pixel_values, atol=1e-5, rtol=0)

    with torch.no_grad():
        theirs = llava(**hf_inputs).logits[0, :, : model.vocab_size]
        mine = model(ours.input_ids[None], visuals=VisualBatch(ours.images)).logits[0]
    torch.testing.assert_close(theirs, mine, atol=1e-4, rtol=1e-4)

    expected = generate(model, [ours], GenerationConfig(max_new_tokens=10))[0]
    hf_out = llava.generate(**hf_inputs, max_new_tokens=10, do_sample=False)[0, hf_inputs["input_ids"].shape[1]:].tolist()
    stops = set(llava.generation_config.eos_token_id)
    hf_out = hf_out[: next((i for i, t in enumerate(hf_out) if t in stops), len(hf_out))]
    assert hf_out == expected


def test_clip_tower_penultimate_layer_exports(tmp_path):
    clip = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    model = build({"name": "hf-random", "model_type": "clip_vision_model", "config": clip, "feature_layer": -2}, processor={"options": {"fit": "crop"}})
    out = export_llava(model, tmp_path / "llava-clip")
    assert verify_export(model, out) < 1e-4


@pytest.mark.parametrize("problem", ["efficientnet", "input_norm", "connector"])
def test_unexportable_models_fail_with_a_reason(problem):
    if problem == "efficientnet":
        pytest.importorskip("efficientnet_lite_pytorch")
        model = build({"name": "efficientnet-lite0"}, processor={"image_size": 64})
        with pytest.raises(ExportError, match="EfficientNet"):
            check_exportable(model)
    elif problem == "input_norm":
        with pytest.raises(ExportError, match="input_norm"):
            check_exportable(siglip_model(connector_options={"input_norm": True}))
    else:
        model = siglip_model()
        model.config.connector.name = "linear"
        model.connector = torch.nn.Linear(32, 32)
        with pytest.raises(ExportError, match="MLP"):
            check_exportable(model)


def test_every_export_blocker_is_named_at_once():
    # The quickstart model has two blockers (input_norm, the EfficientNet tower); a user fixing one
    # must not discover the next only on the following run.
    model = siglip_model(connector_options={"input_norm": True})
    model.config.processor.name = "dynamic"
    with pytest.raises(ExportError) as err:
        check_exportable(model)
    message = str(err.value)
    assert "2 things block the export" in message
    assert "input_norm" in message and "processor 'dynamic'" in message


def test_import_round_trip_trains_and_generates(tmp_path):
    from vlmkit.checkpoint import load_checkpoint

    model = siglip_model(seed=3)
    hf_dir = export_llava(model, tmp_path / "llava")
    ckpt = import_llava(hf_dir, tmp_path / "imported")
    loaded, config = load_checkpoint(ckpt)
    assert loaded.image_token_id == model.image_token_id and loaded.tokens_per_image == model.tokens_per_image

    image = Image.new("RGB", (40, 40), (10, 120, 240))
    proc_a = build_chat_processor(model, 256)
    proc_b = build_chat_processor(loaded, config.train.max_length)
    a = proc_a.encode_prompt([Message("user", "<image>\nColour?")], [image])
    b = proc_b.encode_prompt([Message("user", "<image>\nColour?")], [image])
    assert a.input_ids.tolist() == b.input_ids.tolist()
    torch.testing.assert_close(a.images[0].pixel_values, b.images[0].pixel_values)
    with torch.no_grad():
        la = model(a.input_ids[None], visuals=VisualBatch(a.images)).logits
        lb = loaded(b.input_ids[None], visuals=VisualBatch(b.images)).logits[..., : la.shape[-1]]
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
    assert generate(loaded, [b], GenerationConfig(max_new_tokens=6)) == generate(model, [a], GenerationConfig(max_new_tokens=6))

    # Further training: a supervised step on the imported model changes the loss.
    loaded.train()
    loaded.set_trainable(["connector", "llm"])
    ids = b.input_ids[None]
    labels = ids.clone()
    labels[ids == loaded.image_token_id] = -100
    opt = torch.optim.SGD([p for p in loaded.parameters() if p.requires_grad], lr=0.05)
    first = loaded(ids, visuals=VisualBatch(b.images), labels=labels).loss
    first.backward()
    opt.step()
    second = loaded(ids, visuals=VisualBatch(b.images), labels=labels).loss
    assert torch.isfinite(first.detach()) and second.item() < first.item()


def test_import_refuses_non_llava_folder(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=300, **LLM)).save_pretrained(tmp_path / "lm")
    with pytest.raises(ExportError, match="llava"):
        import_llava(tmp_path / "lm", tmp_path / "out")


def test_cli_export_then_import(tmp_path):
    from typer.testing import CliRunner

    from vlmkit.checkpoint import save_checkpoint
    from vlmkit.cli import app
    from vlmkit.config import Config

    model = siglip_model()
    save_checkpoint(tmp_path / "ckpt", model, Config(model=model.config))
    runner = CliRunner()
    result = runner.invoke(app, ["export-hf", "--checkpoint", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert "matches vlmkit" in result.output
    result = runner.invoke(app, ["import-hf", str(tmp_path / "hf"), str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "back" / "config.json").is_file() and (tmp_path / "back" / "llm" / "config.json").is_file()
