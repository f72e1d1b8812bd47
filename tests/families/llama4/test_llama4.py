"""`vlmkit import-hf` for Llama 4 (its ViT with the pixel-shuffle adapter, a bias-free projector, a
mixture-of-experts decoder with chunked attention, the llama4 processor) on a tiny random folder
saved with `save_pretrained`: the settings it reads, the canvas, views and bfloat16 pixels against
transformers' own Llama4ImageProcessor code (run with torchvision stubbed, on vlmkit's resize) on
random sizes, the prompt's tags, two images in one prompt, export back returning the same tensors,
the recipe (training, odd images, LoRA and its targets) and the presets. Ids, logits and greedy
tokens against transformers for one image per size: tests/families/test_hf_parity.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from _cli import vlmkit
from _parity import import_tiny, noise
from llama4_folder import SETTINGS, llama4_reference, llama4_reference_ids, save_llama4, transformers_image_processor_module
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
def llama4(tmp_path_factory):
    return import_tiny(tmp_path_factory.mktemp("llama4"), save_llama4)


def test_llama4_import_reads_the_folder_settings(llama4):
    _, ckpt, model = llama4
    p = model.config.processor
    assert p.name == "llama4" and p.image_size == 32 and p.resample == "bilinear"
    assert (p.options["patch_size"], p.options["pixel_shuffle_ratio"], p.options["max_patches"]) == (4, 0.5, 4)
    assert tuple(p.mean) == pytest.approx((0.5, 0.4, 0.3)) and tuple(p.std) == pytest.approx((0.25, 0.3, 0.35))
    assert model.config.vision.name == "llama4-vit" and model.config.connector.name == "linear"
    assert model.connector.proj.bias is None and model.config.image_token == "<|patch|>"
    assert model.config.llm.name == "llama4-text" and model.llm.config.model_type == "llama4_text"
    assert model.llm.base_model is model.llm.model  # the decoder, which vlmkit runs
    assert (ckpt / "llm" / "model.safetensors").is_file()


def test_llama4_canvas_and_tokens_match_transformers_rule():
    """The canvas and resized size vlmkit plans without pixels equal transformers' get_best_fit and
    get_max_res_without_distortion (with its one-tile upscale limit), over many sizes and tile limits."""
    from transformers.image_utils import SizeDict

    from vlmkit.families.llama4.processor import Llama4Processor

    module = transformers_image_processor_module()
    g = torch.Generator().manual_seed(0)
    sizes = [tuple(int(x) for x in torch.randint(1, 500, (2,), generator=g)) for _ in range(150)] + [(1, 1), (400, 3), (64, 64)]
    for max_patches in (1, 4, 6, 16):
        proc = Llama4Processor(32, 4, 0.5, max_patches)
        module.find_supported_resolutions.cache_clear()
        canvases = torch.tensor(module.find_supported_resolutions(max_num_chunks=max_patches, patch_size=SizeDict(height=32, width=32)))
        for w, h in sizes:
            th, tw = (int(x) for x in module.get_best_fit((h, w), canvases))
            limit = (min(max(h, 32), th), min(max(w, 32), tw))
            rh, rw = module.get_max_res_without_distortion((h, w), limit)
            (rows, cols), resized = proc.plan(w, h)
            assert (rows * 32, cols * 32) == (th, tw) and resized == (max(rh, 1), max(rw, 1)), (max_patches, w, h)
            views = rows * cols + (rows * cols > 1)
            assert proc.layout(w, h).visual_tokens == views * 16


def test_llama4_views_and_bf16_pixels_equal_transformers_code(llama4):
    folder, _, model = llama4
    g = torch.Generator().manual_seed(1)
    for i in range(20):
        w, h = (int(x) for x in torch.randint(1, 200, (2,), generator=g))
        image = noise(w, h, seed=i)
        ours = model.image_processor.preprocess(image)
        assert ours.layout == model.image_processor.layout(w, h)
        (rows, cols), views = llama4_reference(folder, image)
        assert ours.layout.parts["grid"] == [rows, cols]
        torch.testing.assert_close(ours.pixel_values, views, atol=0, rtol=0)


def test_llama4_prompt_tags():
    from vlmkit.families.llama4.processor import Llama4Processor

    proc = Llama4Processor(32, 4, 0.5, 4)
    one = proc.layout(20, 20)
    assert proc.placeholder_text(one, "P") == "<|image_start|><|image|>" + "P" * 16 + "<|image_end|>"
    wide = proc.layout(90, 30)  # a 1 x 3 canvas + the global tile
    assert wide.parts["grid"] == [1, 3]
    assert proc.placeholder_text(wide, "P") == ("<|image_start|>" + "P" * 16 + "<|tile_x_separator|>" + "P" * 16
                                                + "<|tile_x_separator|>" + "P" * 16 + "<|tile_y_separator|><|image|>" + "P" * 16
                                                + "<|image_end|>")


def test_llama4_two_images_in_one_prompt_match_transformers(llama4):
    folder, _, model = llama4
    images = [noise(90, 30, seed=3), noise(20, 26, seed=4)]
    prompt = build_chat_processor(model, 1 << 16).encode_prompt([Message("user", "<image><image>Which is larger?")], images)
    first = llama4_reference_ids(folder, images[0], "")
    second = llama4_reference_ids(folder, images[1], "Which is larger?")
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    start, end = tok.convert_tokens_to_ids("<|image_start|>"), tok.convert_tokens_to_ids("<|image_end|>")
    block = first[first.tolist().index(start): first.tolist().index(end) + 1]
    at = second.tolist().index(start)
    assert prompt.input_ids.tolist() == torch.cat([second[:at], block, second[at:]]).tolist()
    ref = transformers.Llama4ForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(prompt.input_ids[None], VisualBatch(prompt.images)).logits
        theirs = ref(input_ids=prompt.input_ids[None], pixel_values=torch.cat([im.pixel_values for im in prompt.images])).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_llama4_export_then_import_returns_the_same_tensors(llama4, tmp_path):
    folder, _, model = llama4
    exported = export_hf(model, tmp_path / "hf")
    assert json.loads((exported / "config.json").read_text())["model_type"] == "llama4"
    settings = json.loads((exported / "preprocessor_config.json").read_text())
    assert settings["max_patches"] == SETTINGS["max_patches"] and settings["size"] == SETTINGS["size"]
    assert (exported / "chat_template.jinja").read_text() == (folder / "chat_template.jinja").read_text()
    assert verify_hf_export(model, exported) < 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert again.config.processor == model.config.processor


def test_llama4_recipe_trains_answers_odd_images_and_takes_lora(tmp_path):
    """LoRA targets of the MoE decoder: attention (q_proj, k_proj, v_proj, o_proj) and the linear
    MLPs, which are the dense layers' MLP and each MoE layer's shared expert (gate_proj, up_proj,
    down_proj). The routed experts are stacked (experts, in, out) tensors, not linear layers, and
    stay frozen; so does the router, which keeps the routing the base model learned."""
    from safetensors.torch import load_file

    from vlmkit.data.synthetic.families import write_family_dataset

    recipe = yaml.safe_load((REPO / "recipes" / "families" / "llama4.yaml").read_text())
    recipe["train"]["stages"]["instruct"] |= {"data": "data/train.json", "max_steps": 3, "batch_size": 4}
    recipe["train"]["output_dir"] = "runs/base"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    write_family_dataset(tmp_path / "data", n_train=12, n_test=2, n_video=0, seed=0)  # what `vlmkit data synth-train` writes
    vlmkit(tmp_path, "train", "recipe.yaml")
    ckpt = tmp_path / "runs" / "base" / "checkpoints" / "instruct"
    for size in [(37, 111), (160, 40)]:
        Image.new("RGB", size, (200, 40, 40)).save(tmp_path / f"odd_{size[0]}x{size[1]}.png")
    answer = vlmkit(tmp_path, "chat", "--checkpoint", str(ckpt), "--image", "odd_37x111.png", "What colour?", "--max-new-tokens", "3")
    assert answer.stdout.endswith("\n")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = {"model": {"init_from": str(ckpt)},
            "train": {"output_dir": "runs/lora", "max_length": 2048,
                      "stages": {"lora": {"data": "data/train.json", "trainable": ["llm"], "lr": 1e-3, "batch_size": 2, "max_steps": 2,
                                          "lora": {"parts": ["llm"], "r": 4, "alpha": 8, "targets": targets}}}}}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(lora))
    vlmkit(tmp_path, "train", "lora.yaml")
    trained = tmp_path / "runs" / "lora" / "checkpoints" / "lora"
    names = list(load_file(trained / "adapters.safetensors"))
    assert any(".shared_expert.gate_proj.lora_A" in n for n in names) and any(".feed_forward.down_proj.lora_A" in n for n in names)
    assert not any("experts.gate_up_proj" in n or "router" in n for n in names)
    # The adapted model answers the other odd image (in-process: the command's path ran above).
    adapted, _ = load_checkpoint(trained)
    prompt = build_chat_processor(adapted, 2048).encode_prompt([Message("user", "<image>\nWhat?")], [Image.open(tmp_path / "odd_160x40.png")])
    assert len(generate(adapted, [prompt], GenerationConfig(max_new_tokens=3))[0]) <= 3


def test_llama4_presets_count_and_budget():
    """Scout and Maverick at real shape within 1% of their published totals; `vlmkit tokens` counts
    the parameters a token passes through (router, shared expert and its top-1 expert, not all 16
    or 128), about 15B matrix parameters besides the embeddings, of Meta's 17B active."""
    from vlmkit import presets
    from vlmkit.presets import image_processor
    from vlmkit.presets.budget import get_preset

    for name in ("llama4-scout", "llama4-maverick"):
        meta = presets.build_meta(name)
        total = meta.params()["total"]
        assert abs(total / meta.preset.published_total - 1) < 0.01, (name, total)
        proc = image_processor(meta)
        assert proc.layout(336, 336).visual_tokens == 144 and proc.layout(672, 336).visual_tokens == 3 * 144
        active = get_preset(name).llm.active_params
        assert 14e9 < active < 16e9, (name, active)


def test_llama4_import_names_what_it_cannot_read(tmp_path):
    from vlmkit.hf.folder import ExportError

    folder = save_llama4(tmp_path / "hf")
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(settings | {"resize_to_max_canvas": True}))
    with pytest.raises(ExportError, match="resize_to_max_canvas"):
        import_hf(folder, tmp_path / "out")
    (folder / "preprocessor_config.json").write_text(json.dumps(settings | {"size": {"height": 48, "width": 48}}))
    with pytest.raises(ExportError, match="tile"):
        import_hf(folder, tmp_path / "out")
