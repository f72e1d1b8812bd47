"""`vlmkit import-hf` for Ovis2 (AIMv2 ViT, the `visual-embedding-table` connector, Qwen2 decoder,
covering-area tiling with a thumbnail first) on a tiny random folder saved with
`save_pretrained`: the settings it reads, the tile grid and pixels against Ovis2's PIL image
processor, the structure tokens embedded by the visual table, the connector's tokenizing rules,
export back returning the same tensors, the command line, the presets, and the family recipe
(trains, answers odd-sized images, takes LoRA). Ids, logits and greedy tokens against
transformers: tests/families/test_hf_parity.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from _cli import vlmkit
from _parity import import_tiny, noise
from ovis2_folder import INDICATORS, save_ovis2

from vlmkit.checkpoint import load_checkpoint
from vlmkit.core.types import Message
from vlmkit.hf.registry import export_hf, import_hf, verify_hf_export
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch

REPO = Path(__file__).resolve().parents[3]

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ovis(tmp_path_factory):
    return import_tiny(tmp_path_factory.mktemp("ovis2"), save_ovis2)


def test_ovis2_import_reads_the_folder_settings(ovis):
    _, ckpt, model = ovis
    p = model.config.processor
    assert p.name == "ovis2" and p.image_size == 32 and p.resample == "bicubic"
    assert (p.options["patch_size"], p.options["downsample_ratio"], p.options["max_num"], p.options["covering"]) == (4, 0.5, 6, True)
    assert tuple(p.mean) == pytest.approx((0.5, 0.4, 0.3)) and tuple(p.std) == pytest.approx((0.25, 0.3, 0.35))
    assert model.config.vision.model_type == "aimv2_vision_model" and model.config.vision.config["use_head"] is False
    assert model.config.connector.name == "visual-embedding-table"
    assert model.config.connector.options == {"vocab_size": 96, "ratio": 0.5, "tokenize": "softmax", "markers": INDICATORS}
    assert model.config.image_token == "<IMG_ATOM>" and model.marker_ids == model.tokenizer.convert_tokens_to_ids(INDICATORS)
    assert "llm" in model.pretrained_parts and (ckpt / "llm" / "model.safetensors").is_file()


def test_ovis2_tiles_and_pixels_match_its_pil_image_processor(ovis):
    """The views vlmkit promises (without pixels) and makes, and their pixels, equal
    Ovis2ImageProcessorPil's (covering-area grid, thumbnail first): exactly with the PIL resize,
    within 3/255 with the default (torch) one; the grid as transformers' processor returns it."""
    from transformers.models.ovis2.image_processing_pil_ovis2 import Ovis2ImageProcessorPil

    from vlmkit.families.ovis2.processor import Ovis2TileProcessor

    folder, _, model = ovis
    ref = Ovis2ImageProcessorPil.from_pretrained(folder, local_files_only=True)
    p = model.config.processor
    exact = Ovis2TileProcessor(32, 4, 0.5, 1, 6, mean=p.mean, std=p.std, backend="pil")
    std = torch.tensor(p.std).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    for i in range(20):
        w, h = (int(x) for x in torch.randint(1, 300, (2,), generator=g))
        image = noise(w, h, seed=i)
        out = ref([image], return_tensors="pt")
        layout = model.image_processor.layout(w, h)
        assert layout.parts["grid"] == out["grids"][0].tolist(), (w, h)
        assert layout.visual_tokens == out["pixel_values"].shape[0] * 16, (w, h)
        ours = model.image_processor.preprocess(image)
        assert ours.pixel_values.shape == out["pixel_values"].shape, (w, h)
        assert ((ours.pixel_values - out["pixel_values"]).abs() * std).max() <= 3 / 255 + 1e-6, (w, h)
        torch.testing.assert_close(exact.preprocess(image).pixel_values, out["pixel_values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("max_patches", [1, 4, 9, 12])
def test_ovis2_grids_match_transformers(max_patches):
    """Covering-area grids (transformers' get_min_tile_covering_grid, read as (cols, rows) as its
    crop does) and, without covering, GotOcr2's closest-aspect canvas."""
    from transformers.models.ovis2.image_processing_pil_ovis2 import get_min_tile_covering_grid, get_optimal_tiled_canvas

    from vlmkit.families.ovis2.processor import Ovis2TileProcessor

    covering = Ovis2TileProcessor(image_size=32, patch_size=4, max_num=max_patches)
    closest = Ovis2TileProcessor(image_size=32, patch_size=4, max_num=max_patches, covering=False)
    for w in range(1, 260, 9):
        for h in (1, 9, 32, 64, 100, 190, 255):
            if max_patches > 1:
                assert covering.grid(w, h) == get_min_tile_covering_grid((h, w), 32, max_patches), (w, h)
                assert closest.grid(w, h) == get_optimal_tiled_canvas((h, w), (32, 32), 1, max_patches), (w, h)
            else:
                assert covering.grid(w, h) == (1, 1)


def test_ovis2_prompt_layout():
    from vlmkit.families.ovis2.processor import Ovis2TileProcessor

    proc = Ovis2TileProcessor(image_size=32, patch_size=4, max_num=6)
    one = proc.layout(30, 30)
    assert one.visual_tokens == 16 and proc.placeholder_text(one, "P") == "<IMG_START>" + "P" * 16 + "<IMG_GRID><IMG_END>"
    big = proc.layout(64, 64)  # 2 x 2 tiles + the thumbnail first
    assert big.parts["grid"] == [2, 2] and big.visual_tokens == 5 * 16 and big.special_tokens == 3 + 3
    tile = "P" * 16
    assert proc.placeholder_text(big, "P") == (f"<IMG_START>{tile}<IMG_GRID>{tile}<IMG_COL>{tile}<IMG_ROW>{tile}<IMG_COL>{tile}"
                                               "<IMG_END>")
    roles = [v.role for v in proc.preprocess(noise(64, 64, seed=0)).views]
    assert roles == ["thumbnail"] + ["tile"] * 4


def test_ovis2_structure_tokens_take_the_visual_tables_rows(ovis):
    """In a prompt with an image, `<IMG_START>` .. `<IMG_END>` are embedded by the visual table's
    last rows (in visual_indicator_token_ids' order); without images, by the LLM's table."""
    _, _, model = ovis
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>\nWhat?")], [noise(64, 64, seed=1)])
    ids = prompt.input_ids[None]
    with torch.no_grad():
        embeds = model.inputs_embeds(ids, VisualBatch(prompt.images))
        text = model.inputs_embeds(ids[:, :3])
    rows = model.connector.table.weight[-len(INDICATORS):]
    for k, token_id in enumerate(model.marker_ids):
        where = (ids[0] == token_id).nonzero().flatten()
        assert len(where) >= 1 or INDICATORS[k] == "<IMG_ROW>"
        for i in where.tolist():
            assert torch.equal(embeds[0, i], rows[k])
    torch.testing.assert_close(text, model.llm.get_input_embeddings()(ids[:, :3]))


def test_ovis2_two_images_in_one_prompt_match_transformers(ovis):
    """Two images of different tile grids in one turn: ids as Ovis2Processor writes them, logits
    within 1e-4 of Ovis2ForConditionalGeneration's (fp32)."""
    from transformers import Ovis2ForConditionalGeneration, Ovis2Processor

    folder, _, model = ovis
    images = [noise(90, 30, seed=3), noise(20, 20, seed=4)]
    content = [{"type": "image", "image": images[0]}, {"type": "image", "image": images[1]}, {"type": "text", "text": "Same?"}]
    ref = Ovis2Processor.from_pretrained(folder, local_files_only=True).apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>\n<image>\nSame?")], images)
    assert prompt.input_ids.tolist() == ref["input_ids"][0].tolist()
    hf = Ovis2ForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    pixels = torch.cat([im.pixel_values for im in prompt.images])
    with torch.no_grad():
        ours = model(prompt.input_ids[None], VisualBatch(prompt.images)).logits
        theirs = hf(input_ids=prompt.input_ids[None], pixel_values=pixels).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_visual_embedding_table_tokenizes_as_configured():
    """softmax: probability rows summing to 1, tokens their weighted sums of the word rows;
    st_argmax: one-hot forward, gradient flowing back to the head; markers are the last rows."""
    from vlmkit.model.connectors import build_connector

    torch.manual_seed(0)
    features = torch.randn(2, 16, 8)
    soft = build_connector("visual-embedding-table", 8, 12, {"vocab_size": 20, "ratio": 0.5, "markers": ["<a>", "<b>"]})
    probs = soft.probabilities(features, (4, 4))
    assert probs.shape == (2, 4, 18)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4))
    torch.testing.assert_close(soft(features, (4, 4)), probs @ soft.table.weight[:18])
    assert torch.equal(soft.marker_embeddings(), soft.table.weight[18:]) and soft.marker_tokens() == ("<a>", "<b>")
    hard = build_connector("visual-embedding-table", 8, 12, {"vocab_size": 20, "ratio": 0.5, "tokenize": "st_argmax"})
    out = hard.probabilities(features, (4, 4))
    assert torch.equal(out.detach().sum(-1), torch.ones(2, 4)) and torch.equal(out.detach().max(-1).values, torch.ones(2, 4))
    out.pow(2).mul(torch.arange(20.0)).sum().backward()
    assert hard.head_linear.weight.grad.abs().sum() > 0
    assert hard.marker_embeddings() is None
    with pytest.raises(ValueError, match="feature grid"):
        soft(torch.randn(1, 15, 8), (3, 5))
    with pytest.raises(ValueError, match="no visual words"):
        build_connector("visual-embedding-table", 8, 12, {"vocab_size": 2, "markers": ["<a>", "<b>"]})


def test_ovis2_export_then_import_returns_the_same_tensors(ovis, tmp_path):
    folder, _, model = ovis
    exported = export_hf(model, tmp_path / "hf")
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "ovis2" and config["visual_indicator_token_ids"] == model.marker_ids
    assert (exported / "chat_template.jinja").read_text() == (folder / "chat_template.jinja").read_text()
    assert verify_hf_export(model, exported) < 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert again.config.processor == model.config.processor and again.config.connector == model.config.connector


def test_ovis2_imports_from_the_command_line(ovis, tmp_path):
    folder, _, model = ovis
    vlmkit(tmp_path, "import-hf", str(folder), "imported")
    again, _ = load_checkpoint(tmp_path / "imported")
    assert again.config.connector == model.config.connector
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # 150x37: transformers' covering grid (5, 1) read as 5 columns, 1 row + the thumbnail, 16 tokens each.
    assert again.image_processor.layout(150, 37).visual_tokens == 6 * 16


def test_ovis2_preset_counts_and_tiles():
    from vlmkit import presets
    from vlmkit.presets import image_processor

    for name, published in (("ovis2-1b", 1.27e9), ("ovis2-2b", 2.455e9)):
        report = presets.inspect_preset(name)
        assert abs(report["params"]["total"] / published - 1) < 0.01, report["params"]
    proc = image_processor(presets.build_meta("ovis2-1b"))
    assert proc.layout(448, 448).visual_tokens == 256
    assert proc.layout(896, 896).visual_tokens == (4 + 1) * 256  # 2 x 2 tiles + thumbnail


def test_ovis2_recipe_trains_answers_odd_images_and_takes_lora(tmp_path):
    from PIL import Image

    from vlmkit.data.synthetic.families import write_family_dataset
    from vlmkit.generate import GenerationConfig, generate

    recipe = yaml.safe_load((REPO / "recipes" / "families" / "ovis2.yaml").read_text())
    recipe["train"]["stages"]["instruct"] |= {"data": "data/train.json", "max_steps": 3, "batch_size": 4}
    recipe["train"]["output_dir"] = "runs/base"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    write_family_dataset(tmp_path / "data", n_train=12, n_test=2, n_video=0)  # `vlmkit data synth-train`
    vlmkit(tmp_path, "train", "recipe.yaml")
    ckpt = tmp_path / "runs" / "base" / "checkpoints" / "instruct"
    model, _ = load_checkpoint(ckpt)
    chat = build_chat_processor(model, 2048)
    for size in [(37, 111), (160, 40)]:
        image = Image.new("RGB", size, (200, 40, 40))
        prompt = chat.encode_prompt([Message("user", chat.with_leading_images("What colour?", 1))], [image])
        assert len(generate(model, [prompt], GenerationConfig(max_new_tokens=3))[0]) <= 3
    image.save(tmp_path / "odd_160x40.png")
    lora = {"model": {"init_from": str(ckpt)},
            "train": {"output_dir": "runs/lora", "max_length": 2048,
                      "stages": {"lora": {"data": "data/train.json", "trainable": ["llm"], "lr": 1e-3, "batch_size": 2, "max_steps": 2,
                                          "lora": {"parts": ["llm"], "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}}}}}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(lora))
    vlmkit(tmp_path, "train", "lora.yaml")
    trained = tmp_path / "runs" / "lora" / "checkpoints" / "lora"
    assert (trained / "adapters.safetensors").is_file()
    assert vlmkit(tmp_path, "chat", "--checkpoint", str(trained), "--image", "odd_160x40.png", "What?", "--max-new-tokens", "3").stdout
