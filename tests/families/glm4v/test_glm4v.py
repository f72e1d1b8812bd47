"""`vlmkit import-hf` for GLM-4.1V on tiny random folders saved with `save_pretrained`: a tied
head, weights initialised at 0.2 and two images in one prompt against transformers (ids,
counts, grids, pixels, logits, greedy); the processor's size rule against transformers' own on
random sizes; export back returning the same tensors; the preset at real shape. Single-image
parity on four sizes: tests/families/test_hf_parity.py."""

from __future__ import annotations

import json
import random

import pytest
import torch
from _parity import check_against_transformers, check_generated_image_token, noise
from glm4v_folder import check_against_processor, glm4v_reference_ids, save_glm4v

from vlmkit.checkpoint import load_checkpoint
from vlmkit.core.types import Message
from vlmkit.families.glm4v.processor import Glm4vProcessor
from vlmkit.families.qwen2_vl.hf import mrope_reference_inputs
from vlmkit.hf.registry import export_hf, import_hf, verify_hf_export
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm4v")
    folder = save_glm4v(root / "hf", seed=3, tie=True, init=0.2)
    ckpt = import_hf(folder, root / "vlmkit")
    model, _ = load_checkpoint(ckpt)
    return folder, ckpt, model


def test_glm4v_tied_two_images_logits_and_greedy_match_transformers(glm):
    from transformers import AutoModelForImageTextToText

    folder, _, model = glm
    images = [noise(w, h, seed=i + 1) for i, (w, h) in enumerate([(71, 45), (30, 90)])]
    text = "Describe the picture."
    ref_ids, ref_pixels, counts = glm4v_reference_ids(folder, images, text)
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>" * len(images) + text)], images)
    assert prompt.input_ids.tolist() == ref_ids.tolist()
    kwargs = check_against_processor(ref_pixels, counts, prompt, model)

    ref = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    assert type(ref).__name__ == "Glm4vForConditionalGeneration" and ref.config.tie_word_embeddings
    ids = prompt.input_ids[None]
    check_against_transformers(model, ref, prompt, ids[0], kwargs, positions=True)


def test_glm4v_import_reads_the_folder(glm):
    _, ckpt, model = glm
    p = model.config.processor
    assert p.name == "glm4v" and model.config.vision.name == "glm4v-vit" and model.config.connector.name == "glm4v-merger"
    assert p.options["min_pixels"] == 256 and p.options["max_pixels"] == 16384 and p.options["patch_size"] == 4
    assert tuple(p.mean) == pytest.approx((0.5, 0.4, 0.3)) and tuple(p.std) == pytest.approx((0.25, 0.3, 0.35))
    assert model.config.image_token == "<|image|>" and model.position_rule == "mrope"
    assert model.llm.config.rope_parameters["partial_rotary_factor"] == 0.5
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight
    assert model.pretrained_parts == {"llm"} and (ckpt / "llm" / "model.safetensors").is_file()


def test_glm4v_sizes_and_pixels_match_the_pil_image_processor_on_random_sizes(glm):
    """The clip-wide smart_resize (an image is 2 frames) and the patch layout, against
    Glm4vImageProcessorPil, including sides shorter than one merge window (scaled up first)."""
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    folder, _, model = glm
    ip = Glm4vImageProcessorPil.from_pretrained(folder, local_files_only=True)
    proc = model.image_processor
    assert isinstance(proc, Glm4vProcessor)
    rng = random.Random(0)
    sizes = [(5, 40), (300, 7), (129, 77)] + [(rng.randint(6, 160), rng.randint(6, 160)) for _ in range(5)]
    for w, h in sizes:
        image = noise(w, h, seed=w * h)
        ours = proc.preprocess(image)
        theirs = ip(images=[image], return_tensors="pt")
        assert list(ours.views[0].grid) == theirs["image_grid_thw"][0].tolist(), (w, h)
        assert ours.layout.visual_tokens == int(theirs["image_grid_thw"][0].prod()) // 4
        std = torch.tensor(proc.std).repeat_interleave(ours.pixel_values.shape[1] // 3)
        assert ((ours.pixel_values - theirs["pixel_values"]).abs() * std).max() <= 3 / 255 + 1e-6, (w, h)


def test_glm4v_export_then_import_returns_the_same_tensors(glm, tmp_path):
    _, _, model = glm
    exported = export_hf(model, tmp_path / "hf")
    assert json.loads((exported / "config.json").read_text())["model_type"] == "glm4v"
    assert verify_hf_export(model, exported) <= 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert again.config.processor == model.config.processor


def test_glm4v_lora_on_the_decoder_trains(glm):
    import copy

    from vlmkit.model.lora import add_adapters

    model = copy.deepcopy(glm[2])
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>What?")], [noise(40, 56, seed=6)])
    ids, visuals, positions = prompt.input_ids[None], VisualBatch(prompt.images), prompt.position_ids[:, None]
    model.set_trainable(["llm"])
    # GLM's attention projections and its fused gate_up MLP.
    add_adapters(model, {"parts": ["llm"], "r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj", "gate_up_proj"]})
    labels = ids.clone()
    labels[:, : ids.shape[1] - 4] = -100
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(ids, visuals, position_ids=positions, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_glm4v_preset_matches_the_published_total_within_1_percent():
    from vlmkit import presets

    meta = presets.build_meta("glm4.1v-9b")
    assert abs(meta.params()["total"] / 10.29e9 - 1) < 0.01, meta.params()


def test_glm4v_decoding_survives_its_own_image_token(tmp_path):
    """A model that emits its image slot token while decoding: the token is text, as in
    transformers' generate."""
    from transformers import Glm4vForConditionalGeneration

    folder = save_glm4v(tmp_path / "hf", seed=5)
    model, _ = load_checkpoint(import_hf(folder, tmp_path / "vlmkit"))
    ref = Glm4vForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    check_generated_image_token(model, ref, noise(40, 56, seed=7), lambda prompt, ids: mrope_reference_inputs(model, prompt, ids))


def test_glm45v_moe_exports_back_and_takes_lora_on_attention(tmp_path):
    """GLM-4.5V (glm4v_moe): the folder's per-expert projections are fused on import as
    transformers fuses them; export then import gives equal tensors; LoRA targets the attention
    projections and the dense / shared-expert MLPs (the routed experts are fused 3-D parameters,
    not linear layers, and stay frozen)."""
    from vlmkit.model.lora import add_adapters

    model, _ = load_checkpoint(import_hf(save_glm4v(tmp_path / "hf", moe=True, seed=2), tmp_path / "vlmkit"))
    assert model.llm.config.model_type == "glm4v_moe_text"
    exported = export_hf(model, tmp_path / "back")
    assert json.loads((exported / "config.json").read_text())["model_type"] == "glm4v_moe"
    assert verify_hf_export(model, exported) <= 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb) and any("experts.gate_up_proj" in k for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    model.set_trainable(["llm"])
    add_adapters(model, {"parts": ["llm"], "r": 4, "alpha": 8, "dropout": 0.0,
                         "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]})
    trained = {n for n, p in model.llm.named_parameters() if p.requires_grad}
    assert trained and all("lora" in n for n in trained) and not any(".experts." in n for n in trained)
