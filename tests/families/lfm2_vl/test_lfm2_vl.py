"""`vlmkit import-hf` for LFM2-VL (SigLIP2 NaFlex, pixel unshuffle + LayerNorm + MLP, an LFM2
short-conv/attention decoder, the lfm2_vl processor) on a tiny random folder saved with
`save_pretrained`: the settings it reads, the layout, views and pixels against transformers' own
Lfm2VlImageProcessor code (run with torchvision stubbed, on vlmkit's resize) on random sizes, the
prompt's tags, two images in one prompt, export back returning the same tensors, the recipe
(training, odd images, LoRA) and the command line. Ids, logits and greedy tokens against
transformers for one image per size: tests/families/test_hf_parity.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from _cli import vlmkit
from _parity import import_tiny, noise
from lfm2_vl_folder import (
    SETTINGS,
    _layout_kwargs,
    lfm2_reference,
    lfm2_reference_ids,
    save_lfm2_vl,
    transformers_image_processor_module,
)
from PIL import Image

from vlmkit.checkpoint import load_checkpoint
from vlmkit.core.types import Message
from vlmkit.generate import GenerationConfig, generate
from vlmkit.hf.registry import export_hf, import_hf, verify_hf_export
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch

REPO = Path(__file__).resolve().parents[3]

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lfm(tmp_path_factory):
    return import_tiny(tmp_path_factory.mktemp("lfm2_vl"), save_lfm2_vl)


def test_lfm2_vl_import_reads_the_folder_settings(lfm):
    _, ckpt, model = lfm
    p = model.config.processor
    assert p.name == "lfm2_vl" and p.image_size == 32 and p.resample == "bilinear"
    assert tuple(p.mean) == pytest.approx((0.5, 0.4, 0.3)) and tuple(p.std) == pytest.approx((0.25, 0.3, 0.35))
    assert {k: p.options[k] for k in ("patch_size", "downsample", "min_image_tokens", "max_image_tokens", "min_tiles", "max_tiles")} \
        == {"patch_size": 4, "downsample": 2, "min_image_tokens": 4, "max_image_tokens": 16, "min_tiles": 2, "max_tiles": 4}
    assert model.config.vision.name == "siglip2-naflex" and model.config.connector.name == "pixel-shuffle"
    assert model.config.connector.options == {"ratio": 0.5, "norm": "post", "norm_eps": 1e-5, "projector": "mlp", "hidden_size": 80,
                                              "bias": True}
    assert model.llm.config.model_type == "lfm2" and model.config.image_token == "<image>"
    assert "llm" in model.pretrained_parts and (ckpt / "llm" / "model.safetensors").is_file()


def _variants():
    yield SETTINGS
    yield SETTINGS | {"use_thumbnail": False}
    yield SETTINGS | {"do_image_splitting": False}
    yield SETTINGS | {"min_tiles": 3, "max_tiles": 6, "max_pixels_tolerance": 1.0, "min_image_tokens": 9}


def _processor(model, s):
    from vlmkit.families.lfm2_vl.processor import Lfm2VlProcessor

    p = model.config.processor
    return Lfm2VlProcessor(32, 4, 2, s["min_image_tokens"], s["max_image_tokens"], s["min_tiles"], s["max_tiles"], s["use_thumbnail"],
                           s["do_image_splitting"], s["max_pixels_tolerance"], mean=p.mean, std=p.std)


def test_lfm2_vl_layout_matches_transformers_rule(lfm):
    """vlmkit's layout without pixels (tile grid, resized size, token count, text) equals what
    transformers' Lfm2VlImageProcessor._get_split_layout and Lfm2VlProcessor's counts give, over
    many sizes and several settings (no thumbnail, no splitting, other tile limits)."""
    module = transformers_image_processor_module()
    ref = object.__new__(module.Lfm2VlImageProcessor)
    _, _, model = lfm
    g = torch.Generator().manual_seed(0)
    sizes = [tuple(int(x) for x in torch.randint(1, 400, (2,), generator=g)) for _ in range(150)] + [(1, 1), (300, 5), (64, 64)]
    for s in _variants():
        proc = _processor(model, s)
        for w, h in sizes:
            do_split, rows, cols, rh, rw = ref._get_split_layout(h, w, **_layout_kwargs(s))
            layout = proc.layout(w, h)
            assert layout.parts["grid"] == [rows, cols] and layout.parts["resized"] == [rh, rw], (s, w, h)
            tiles = rows * cols * 16 if do_split else 0
            whole = (rh // 8) * (rw // 8) if (not do_split or s["use_thumbnail"]) else 0
            assert layout.visual_tokens == tiles + whole, (s, w, h)


def test_lfm2_vl_views_and_pixels_match_transformers_code(lfm):
    """Every view (tiles row-major, then the thumbnail) cut into patches as transformers does,
    with its patch grid; pixels equal to 1e-5 (the reference resizes with the same kernel)."""
    folder, _, model = lfm
    g = torch.Generator().manual_seed(1)
    for i in range(20):
        w, h = (int(x) for x in torch.randint(1, 260, (2,), generator=g))
        image = noise(w, h, seed=i)
        ours = model.image_processor.preprocess(image)
        assert ours.layout == model.image_processor.layout(w, h)
        _, _, patches, shapes, mask, _ = lfm2_reference(folder, image)
        assert len(ours.views) == patches.shape[0], (w, h)
        for k, (view, px) in enumerate(zip(ours.views, ours.view_pixels())):
            assert model.vision.grid_hw(*view.size) == tuple(shapes[k].tolist())
            flat = model.vision.patches(px[None])[0]
            assert int(mask[k].sum()) == flat.shape[0]
            torch.testing.assert_close(flat, patches[k, : flat.shape[0]], atol=1e-5, rtol=0)


def test_lfm2_vl_prompt_tags():
    from vlmkit.families.lfm2_vl.processor import Lfm2VlProcessor

    proc = Lfm2VlProcessor(32, 4, 2, 4, 16, 2, 4)
    one = proc.layout(30, 30)
    assert one.visual_tokens == 16 and proc.placeholder_text(one, "P") == "<|image_start|>" + "P" * 16 + "<|image_end|>"
    wide = proc.layout(90, 30)  # too large: a 1 x 3 tile grid + the thumbnail (resized to 48 x 16 px: 6 x 2 tokens)
    assert wide.parts["grid"] == [1, 3] and wide.parts["resized"] == [16, 48]
    assert proc.placeholder_text(wide, "P") == ("<|image_start|>" + "".join(f"<|img_row_1_col_{c}|>" + "P" * 16 for c in (1, 2, 3))
                                                + "<|img_thumbnail|>" + "P" * 12 + "<|image_end|>")


def test_lfm2_vl_two_images_in_one_prompt_match_transformers(lfm):
    folder, _, model = lfm
    from vlmkit.families.lfm2_vl.hf import naflex_inputs

    images = [noise(90, 30, seed=3), noise(20, 26, seed=4)]
    chat = build_chat_processor(model, 1 << 16)
    prompt = chat.encode_prompt([Message("user", "<image><image>Which is larger?")], images)
    # transformers' text: each image expanded by its own rule, in order.
    first = lfm2_reference_ids(folder, images[0], "")
    second = lfm2_reference_ids(folder, images[1], "Which is larger?")
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    start = tok.convert_tokens_to_ids("<|image_start|>")
    end = tok.convert_tokens_to_ids("<|image_end|>")
    block = first[first.tolist().index(start): first.tolist().index(end) + 1]
    at = second.tolist().index(start)
    expected = torch.cat([second[:at], block, second[at:]])
    assert prompt.input_ids.tolist() == expected.tolist()
    ref = transformers.Lfm2VlForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(prompt.input_ids[None], VisualBatch(prompt.images)).logits
        theirs = ref(input_ids=prompt.input_ids[None], **naflex_inputs(model, prompt.images)).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_lfm2_vl_export_then_import_returns_the_same_tensors(lfm, tmp_path):
    folder, _, model = lfm
    exported = export_hf(model, tmp_path / "hf")
    assert json.loads((exported / "config.json").read_text())["model_type"] == "lfm2_vl"
    settings = json.loads((exported / "preprocessor_config.json").read_text())
    assert {k: settings[k] for k in _layout_kwargs(SETTINGS)} == _layout_kwargs(SETTINGS)
    assert settings["use_thumbnail"] and settings["do_image_splitting"] and settings["image_mean"] == pytest.approx([0.5, 0.4, 0.3])
    assert (exported / "chat_template.jinja").read_text() == (folder / "chat_template.jinja").read_text()
    assert verify_hf_export(model, exported) < 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert again.config.processor == model.config.processor and again.config.connector == model.config.connector


def test_lfm2_vl_without_projector_layernorm_imports_and_exports(tmp_path):
    model, _ = load_checkpoint(import_hf(save_lfm2_vl(tmp_path / "src", layernorm=False), tmp_path / "vlmkit"))
    assert model.config.connector.options["norm"] == "none"
    exported = export_hf(model, tmp_path / "hf")
    assert json.loads((exported / "config.json").read_text())["projector_use_layernorm"] is False
    assert verify_hf_export(model, exported) < 1e-4


def test_lfm2_vl_recipe_trains_answers_odd_images_and_takes_lora(tmp_path):
    """LoRA on every linear layer of both block kinds: attention (q_proj, k_proj, v_proj, out_proj),
    short conv (in_proj, out_proj; the depthwise kernel itself stays frozen) and the SwiGLU MLP
    (w1, w2, w3)."""
    recipe = yaml.safe_load((REPO / "recipes" / "families" / "lfm2-vl.yaml").read_text())
    recipe["train"]["stages"]["instruct"] |= {"data": "data/train.json", "max_steps": 3, "batch_size": 4}
    recipe["train"]["output_dir"] = "runs/base"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    from vlmkit.data.synthetic.families import write_family_dataset

    write_family_dataset(tmp_path / "data", n_train=12, n_test=2, n_video=0, seed=0)  # what `vlmkit data synth-train` writes
    vlmkit(tmp_path, "train", "recipe.yaml")
    ckpt = tmp_path / "runs" / "base" / "checkpoints" / "instruct"
    for size in [(37, 111), (160, 40)]:
        Image.new("RGB", size, (200, 40, 40)).save(tmp_path / f"odd_{size[0]}x{size[1]}.png")
    answer = vlmkit(tmp_path, "chat", "--checkpoint", str(ckpt), "--image", "odd_37x111.png", "What colour?", "--max-new-tokens", "3")
    assert answer.stdout.endswith("\n")
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"]
    lora = {"model": {"init_from": str(ckpt)},
            "train": {"output_dir": "runs/lora", "max_length": 2048,
                      "stages": {"lora": {"data": "data/train.json", "trainable": ["llm"], "lr": 1e-3, "batch_size": 2, "max_steps": 2,
                                          "lora": {"parts": ["llm"], "r": 4, "alpha": 8, "targets": targets}}}}}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(lora))
    vlmkit(tmp_path, "train", "lora.yaml")
    trained = tmp_path / "runs" / "lora" / "checkpoints" / "lora"
    from safetensors.torch import load_file

    names = list(load_file(trained / "adapters.safetensors"))
    for t in targets:
        assert any(f".{t}.lora_A" in n for n in names), t
    # The adapted model answers the other odd image (in-process: the command's path ran above).
    adapted, _ = load_checkpoint(trained)
    prompt = build_chat_processor(adapted, 2048).encode_prompt([Message("user", "<image>\nWhat?")], [Image.open(tmp_path / "odd_160x40.png")])
    assert len(generate(adapted, [prompt], GenerationConfig(max_new_tokens=3))[0]) <= 3


def test_lfm2_vl_imports_from_the_command_line(tmp_path):
    save_lfm2_vl(tmp_path / "hf")
    vlmkit(tmp_path, "import-hf", "hf", "imported")
    model, _ = load_checkpoint(tmp_path / "imported")
    # 150x37 is over twice the 16-token budget: a 1 x 4 tile grid (16 tokens each) + a 64 x 8 px thumbnail (8 x 1 tokens).
    assert model.image_processor.layout(150, 37).visual_tokens == 4 * 16 + 8
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>What is it?")], [noise(150, 37, seed=2)])
    assert model.count_image_tokens(prompt.images[0]) == 72


def test_lfm2_vl_presets_count_and_tokens():
    from vlmkit import presets
    from vlmkit.presets import image_processor

    for name in ("lfm2-vl-450m", "lfm2-vl-1.6b"):
        meta = presets.build_meta(name)
        total = meta.params()["total"]
        assert abs(total / meta.preset.published_total - 1) < 0.01, (name, total)
        proc = image_processor(meta)
        assert proc.layout(512, 512).visual_tokens == 256 and proc.layout(100, 100).visual_tokens == 64
    # 1024 x 768: too large, a 3 x 2 grid of 512 px tiles (256 tokens each); the 1.6B adds a 576 x 416 thumbnail (18 x 13).
    assert image_processor(presets.build_meta("lfm2-vl-450m")).layout(1024, 768).visual_tokens == 6 * 256
    assert image_processor(presets.build_meta("lfm2-vl-1.6b")).layout(1024, 768).visual_tokens == 6 * 256 + 18 * 13


def test_lfm2_vl_token_budget_counts_only_attention_layers_for_the_kv_cache():
    """LFM2 is a hybrid decoder: 6 of its 16 layers attend, the others are short convolutions with
    a fixed-size state. `vlmkit tokens` reads the shape off an attention layer, counts a KV cache
    for the attention layers only, and the other layers' matrices in the FLOPs."""
    from vlmkit.presets.budget import get_preset, image_budget

    shape = get_preset("lfm2-vl-450m").llm
    assert (shape.layers, shape.attention_layers, shape.d_model, shape.heads, shape.kv_heads, shape.ffn) == (16, 6, 1024, 16, 8, 4608)
    conv = 3 * 1024 * 1024 + 1024 * 1024 + 3 * 1024 * 4608  # in_proj, out_proj, the SwiGLU MLP
    assert shape.active_params == 10 * conv + 6 * shape.layer_params()
    budget = image_budget("lfm2-vl-450m", 512, 512)
    assert budget.visual_tokens == 256 and budget.sequence_tokens == 258
    assert budget.kv_cache_bytes == 258 * 6 * 2 * 8 * 64 * 2


def test_lfm2_vl_refuses_packing(lfm, tmp_path):
    """Packing keeps samples apart inside attention only; LFM2's short convolutions would read the
    previous sample's last tokens, so a packed stage is refused before it trains."""
    from typer.testing import CliRunner

    from vlmkit.cli import app
    from vlmkit.data.synthetic.families import write_family_dataset
    from vlmkit.model.language import non_attention_mixers

    assert non_attention_mixers(lfm[2].llm) == ["conv"]
    recipe = yaml.safe_load((REPO / "recipes" / "families" / "lfm2-vl.yaml").read_text())
    recipe["train"]["stages"]["instruct"] |= {"data": "data/train.json", "max_steps": 1, "batch_size": 2, "packing": True}
    recipe["train"]["output_dir"] = str(tmp_path / "runs")
    write_family_dataset(tmp_path / "data", n_train=4, n_test=1, n_video=0, seed=0)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = CliRunner().invoke(app, ["train", str(tmp_path / "recipe.yaml")])
    assert out.exit_code != 0 and "packing" in out.output and "conv" in out.output, out.output


def test_lfm2_vl_import_names_what_it_cannot_read(tmp_path):
    from vlmkit.hf.folder import ExportError

    folder = save_lfm2_vl(tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"projector_hidden_act": "relu"}))
    with pytest.raises(ExportError, match="projector_hidden_act='relu'"):
        import_hf(folder, tmp_path / "out")
    (folder / "config.json").write_text(json.dumps(config))
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(settings | {"encoder_patch_size": 8}))
    with pytest.raises(ExportError, match="encoder_patch_size 8 differs"):
        import_hf(folder, tmp_path / "out")
