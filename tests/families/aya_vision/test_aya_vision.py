"""`vlmkit import-hf` for Aya Vision (SigLIP, pixel shuffle + SwiGLU projector, Cohere2 decoder,
GotOcr2 tiling) on a tiny random folder saved with `save_pretrained`: the settings it reads, the
tiles and pixels against GotOcr2's PIL image processor on random sizes, the prompt layout, the
logit scale, export back returning the same tensors, and the command line. Ids, logits and greedy
tokens against transformers: tests/families/test_hf_parity.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _cli import vlmkit
from _parity import import_tiny, noise
from aya_vision_folder import save_aya_vision

from vlmkit.checkpoint import load_checkpoint
from vlmkit.hf.registry import export_hf, import_hf, verify_hf_export

REPO = Path(__file__).resolve().parents[3]

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def aya(tmp_path_factory):
    return import_tiny(tmp_path_factory.mktemp("aya_vision"), save_aya_vision)


def test_aya_import_reads_the_folder_settings(aya):
    _, ckpt, model = aya
    p = model.config.processor
    assert p.name == "aya_vision" and p.image_size == 32 and p.resample == "bicubic"
    assert (p.options["patch_size"], p.options["downsample_ratio"], p.options["min_num"], p.options["max_num"]) == (4, 0.5, 1, 6)
    assert tuple(p.mean) == pytest.approx((0.5, 0.4, 0.3)) and tuple(p.std) == pytest.approx((0.25, 0.3, 0.35))
    assert model.config.connector.name == "pixel-shuffle-swiglu"
    assert model.config.connector.options == {"ratio": 0.5, "norm_eps": 1e-6, "hidden_size": 96}
    # transformers reads hidden_states[-1] (before SigLIP's post-layernorm): index 2 of 3 here.
    assert model.config.vision.feature_layer == 2
    assert model.config.llm.name == "hf" and model.config.image_token == "<|IMG_PATCH|>"
    assert "llm" in model.pretrained_parts and (ckpt / "llm" / "model.safetensors").is_file()


def test_aya_head_applies_cohere_logit_scale(aya):
    """Cohere's causal LM multiplies its head's output by logit_scale; vlmkit applies the head
    itself (`lm_head`), with the scale the LLM's config declares, and gives the causal LM's logits."""
    from vlmkit.model.vlm import TransformedHead, lm_head

    _, ckpt, model = aya
    llm = model.llm
    head = lm_head(llm)
    assert llm.config.logit_scale == 0.25 and isinstance(head, TransformedHead) and head.scale == 0.25
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight  # still tied
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        hidden = llm.base_model(input_ids=ids).last_hidden_state
        expected = torch.nn.functional.linear(hidden, llm.get_input_embeddings().weight) * 0.25
        torch.testing.assert_close(head(hidden), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(llm(input_ids=ids).logits, expected, atol=1e-6, rtol=0)
    assert json.loads((ckpt / "llm" / "config.json").read_text())["logit_scale"] == 0.25


def test_aya_tiles_and_pixels_match_got_ocr2_on_random_sizes(aya):
    """The tile grid vlmkit promises (without pixels), the views it makes and their pixels equal
    GotOcr2ImageProcessorPil's (crop_to_patches, min 1 / max 6 tiles, thumbnail): exactly with
    the PIL resize, within 3/255 with the default (torch) one."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from vlmkit.families.aya_vision.processor import AyaVisionProcessor

    folder, _, model = aya
    ref = GotOcr2ImageProcessorPil.from_pretrained(folder, local_files_only=True)
    p = model.config.processor
    exact = AyaVisionProcessor(32, 4, 0.5, 1, 6, p.mean, p.std, backend="pil")
    std = torch.tensor(p.std).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    for i in range(25):
        w, h = (int(x) for x in torch.randint(1, 300, (2,), generator=g))
        image = noise(w, h, seed=i)
        out = ref([image], crop_to_patches=True, return_tensors="pt")
        views = int(out["num_patches"][0])
        assert model.image_processor.layout(w, h).visual_tokens == views * 16, (w, h)
        ours = model.image_processor.preprocess(image)
        assert ours.pixel_values.shape == out["pixel_values"].shape, (w, h)
        assert ((ours.pixel_values - out["pixel_values"]).abs() * std).max() <= 3 / 255 + 1e-6, (w, h)
        torch.testing.assert_close(exact.preprocess(image).pixel_values, out["pixel_values"], atol=1e-5, rtol=0)


def test_aya_grid_order_is_got_ocr2s_when_min_patches_exceeds_one():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    from vlmkit.families.aya_vision.processor import AyaVisionProcessor

    proc = AyaVisionProcessor(image_size=32, patch_size=4, min_num=2, max_num=8)
    for w in range(8, 200, 7):
        for h in (9, 32, 64, 100, 190):
            assert proc.grid(w, h) == get_optimal_tiled_canvas((h, w), (32, 32), 2, 8), (w, h)


def test_aya_prompt_layout():
    from vlmkit.families.aya_vision.processor import AyaVisionProcessor

    proc = AyaVisionProcessor(image_size=32, patch_size=4, max_num=6)
    one = proc.layout(30, 30)
    assert one.visual_tokens == 16 and proc.placeholder_text(one, "P") == "<|START_OF_IMG|>TILE_GLOBAL" + "P" * 16 + "<|END_OF_IMG|>"
    wide = proc.layout(90, 30)  # 3 x 1 tiles + thumbnail
    assert wide.parts["grid"] == [1, 3] and wide.visual_tokens == 4 * 16
    assert proc.placeholder_text(wide, "P") == ("<|START_OF_IMG|>" + "".join(f"TILE_{k}" + "P" * 16 for k in (1, 2, 3))
                                                + "TILE_GLOBAL" + "P" * 16 + "<|END_OF_IMG|>")


def test_aya_export_then_import_returns_the_same_tensors(aya, tmp_path):
    folder, _, model = aya
    template = model.tokenizer.chat_template
    exported = export_hf(model, tmp_path / "hf")
    assert model.tokenizer.chat_template == template  # the processor got a copy
    assert json.loads((exported / "config.json").read_text())["model_type"] == "aya_vision"
    assert (exported / "chat_template.jinja").read_text() == (folder / "chat_template.jinja").read_text()
    assert verify_hf_export(model, exported) < 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert again.config.processor == model.config.processor
    assert again.config.vision.feature_layer == model.config.vision.feature_layer
    assert again.tokenizer.chat_template == template


def test_aya_imports_and_chats_from_the_command_line(tmp_path):
    save_aya_vision(tmp_path / "hf")
    vlmkit(tmp_path, "import-hf", "hf", "imported")
    noise(150, 37, seed=2).save(tmp_path / "odd.png")
    answer = vlmkit(tmp_path, "chat", "--checkpoint", "imported", "--image", "odd.png", "What is it?", "--max-new-tokens", "4")
    assert "Traceback" not in answer.stderr
    tokens = vlmkit(tmp_path, "tokens", "--checkpoint", "imported", "--size", "150x37", "--json")
    # 150x37: a 4 x 1 tile grid + the thumbnail, 16 tokens each.
    assert json.loads(tokens.stdout)["visual_tokens"] == 5 * 16


def test_aya_preset_counts_and_tiles():
    from vlmkit import presets
    from vlmkit.presets import image_processor

    meta = presets.build_meta("aya-vision-8b")
    proc = image_processor(meta)
    assert proc.layout(364, 364).visual_tokens == 169
    assert proc.layout(1456, 728).visual_tokens == (8 + 1) * 169  # 4 x 2 tiles + thumbnail
