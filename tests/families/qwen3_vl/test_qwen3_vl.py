"""`vlmkit import-hf` for Qwen3-VL on tiny random folders saved with `save_pretrained`: a tied
head, weights initialised at 0.2 (the images then move the answer) and two images in one prompt
against transformers (ids, counts, grids, pixels, logits, greedy); DeepStack reaching the
logits; export back returning the same tensors; the presets at real shape. Single-image parity
on four sizes: tests/families/test_hf_parity.py. Video: test_qwen3_vl_video.py."""

from __future__ import annotations

import json

import pytest
import torch
from _cli import vlmkit
from _parity import check_against_transformers, check_generated_image_token, noise
from qwen2_vl_folder import check_against_processor, qwen_reference_ids
from qwen3_vl_folder import save_qwen3vl

from vlmkit.checkpoint import load_checkpoint
from vlmkit.core.types import Message
from vlmkit.families.qwen2_vl.hf import mrope_reference_inputs
from vlmkit.hf.registry import export_hf, import_hf, verify_hf_export
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3vl")
    folder = save_qwen3vl(root / "hf", seed=3, tie=True, init=0.2)
    ckpt = import_hf(folder, root / "vlmkit")
    model, _ = load_checkpoint(ckpt)
    return folder, ckpt, model


def _two_image_prompt(model, folder):
    images = [noise(w, h, seed=i + 1) for i, (w, h) in enumerate([(71, 45), (30, 90)])]
    text = "Describe the picture."
    ref_ids, ref_pixels, counts = qwen_reference_ids(folder, images, text)
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>" * len(images) + text)], images)
    assert prompt.input_ids.tolist() == ref_ids.tolist()
    return prompt, check_against_processor(ref_pixels, counts, prompt, model)


def test_qwen3vl_tied_two_images_logits_and_greedy_match_transformers(qwen3):
    from transformers import AutoModelForImageTextToText

    folder, _, model = qwen3
    prompt, kwargs = _two_image_prompt(model, folder)
    ref = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    assert type(ref).__name__ == "Qwen3VLForConditionalGeneration" and ref.config.tie_word_embeddings
    ids = prompt.input_ids[None]
    check_against_transformers(model, ref, prompt, ids[0], kwargs, positions=True)


def test_qwen3vl_import_reads_the_folder(qwen3):
    _, ckpt, model = qwen3
    p = model.config.processor
    assert p.name == "qwen3vl" and model.config.vision.name == "qwen3-vit" and model.config.connector.name == "qwen3-vl-merger"
    assert p.options["min_pixels"] == 256 and p.options["max_pixels"] == 16384 and p.options["patch_size"] == 4
    assert tuple(p.mean) == pytest.approx((0.5, 0.4, 0.3)) and tuple(p.std) == pytest.approx((0.25, 0.3, 0.35))
    assert model.connector.feature_levels == 2 and model.position_rule == "mrope"
    # A tied head is the embedding table, stored once.
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight
    assert model.pretrained_parts == {"llm"} and (ckpt / "llm" / "model.safetensors").is_file()


def test_deepstack_levels_reach_the_logits(qwen3):
    """Zeroing one DeepStack merger changes the logits at and after the image, not before it."""
    _, _, model = qwen3
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>What?")], [noise(40, 40, seed=5)])
    ids = prompt.input_ids[None]
    first_slot = int((prompt.input_ids == model.image_token_id).nonzero()[0])
    with torch.no_grad():
        base = model(ids, VisualBatch(prompt.images), position_ids=prompt.position_ids[:, None]).logits
        saved = model.connector.levels[1].proj[2].weight.clone()
        model.connector.levels[1].proj[2].weight.zero_()
        try:
            changed = model(ids, VisualBatch(prompt.images), position_ids=prompt.position_ids[:, None]).logits
        finally:
            model.connector.levels[1].proj[2].weight.copy_(saved)
    torch.testing.assert_close(base[:, :first_slot], changed[:, :first_slot], atol=0, rtol=0)
    assert (base[:, first_slot:] - changed[:, first_slot:]).abs().max() > 1e-3


def test_qwen3vl_export_then_import_returns_the_same_tensors(qwen3, tmp_path):
    _, _, model = qwen3
    exported = export_hf(model, tmp_path / "hf")
    assert json.loads((exported / "config.json").read_text())["model_type"] == "qwen3_vl"
    assert verify_hf_export(model, exported) <= 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert again.config.processor == model.config.processor


@pytest.mark.parametrize(("name", "total"), [("qwen3-vl-2b", 2.13e9), ("qwen3-vl-4b", 4.44e9), ("qwen3-vl-8b", 8.77e9),
                                             ("qwen3-vl-32b", 33.4e9), ("qwen3-vl-30b-a3b", 31.1e9),
                                             ("qwen3-vl-235b-a22b", 236e9)])
def test_qwen3vl_presets_match_the_published_totals_within_1_percent(name, total):
    from vlmkit import presets

    meta = presets.build_meta(name)
    assert abs(meta.params()["total"] / total - 1) < 0.01, meta.params()
    # Three DeepStack levels: the connector holds four PatchMergers.
    assert meta.parts["connector"].feature_levels == 3


def test_qwen3vl_lora_keeps_deepstack_and_trains(qwen3):
    """LoRA on the decoder's q/v projections: fresh adapters leave the logits as they were (the
    DeepStack hooks sit on the layers peft adapts), and a few steps lower the loss."""
    import copy

    from vlmkit.model.lora import add_adapters, has_adapters

    _, _, base = qwen3
    model = copy.deepcopy(base)
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>What?")], [noise(40, 56, seed=6)])
    ids, visuals, positions = prompt.input_ids[None], VisualBatch(prompt.images), prompt.position_ids[:, None]
    with torch.no_grad():
        before = model(ids, visuals, position_ids=positions).logits
    model.set_trainable(["llm"])  # as a stage with `trainable: [llm]` and `lora.parts: [llm]`
    add_adapters(model, {"parts": ["llm"], "r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]})
    assert has_adapters(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, visuals, position_ids=positions).logits, before, atol=1e-6, rtol=0)
    labels = ids.clone()
    labels[:, : ids.shape[1] - 4] = -100
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(ids, visuals, position_ids=positions, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_qwen3vl_imports_and_chats_on_an_odd_image_from_the_command_line(tmp_path):
    save_qwen3vl(tmp_path / "hf", init=0.2)
    vlmkit(tmp_path, "import-hf", "hf", "ckpt")
    noise(37, 111, seed=2).save(tmp_path / "odd.png")
    vlmkit(tmp_path, "chat", "--checkpoint", "ckpt", "--image", "odd.png", "What?", "--max-new-tokens", "4")


def test_qwen3vl_decoding_survives_its_own_image_token(tmp_path):
    """A model that emits its image slot token while decoding: the token is text (embedded from
    the table, never a slot waiting for an image, no DeepStack levels), as in transformers' generate."""
    from transformers import Qwen3VLForConditionalGeneration

    folder = save_qwen3vl(tmp_path / "hf", seed=5)
    model, _ = load_checkpoint(import_hf(folder, tmp_path / "vlmkit"))
    ref = Qwen3VLForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    check_generated_image_token(model, ref, noise(40, 56, seed=7), lambda prompt, ids: mrope_reference_inputs(model, prompt, ids))


def test_qwen3vl_moe_exports_back_and_takes_lora_on_attention(tmp_path):
    """Qwen3-VL-MoE: export then import gives equal tensors (the fused expert weights included);
    LoRA targets the attention projections and the dense layers' MLP. The experts are fused 3-D
    parameters in transformers 5, not linear layers, so `lora.targets` cannot name them: they stay
    frozen and the adapters train around them."""
    from vlmkit.model.lora import add_adapters

    model, _ = load_checkpoint(import_hf(save_qwen3vl(tmp_path / "hf", moe=True, seed=2), tmp_path / "vlmkit"))
    assert model.llm.config.model_type == "qwen3_vl_moe_text"
    exported = export_hf(model, tmp_path / "back")
    assert json.loads((exported / "config.json").read_text())["model_type"] == "qwen3_vl_moe"
    assert verify_hf_export(model, exported) <= 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb) and any("experts" in k for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    model.set_trainable(["llm"])
    add_adapters(model, {"parts": ["llm"], "r": 4, "alpha": 8, "dropout": 0.0,
                         "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]})
    trained = {n for n, p in model.llm.named_parameters() if p.requires_grad}
    assert trained and all("lora" in n for n in trained) and not any("experts" in n for n in trained)
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>What?")], [noise(40, 56, seed=6)])
    ids = prompt.input_ids[None]
    labels = ids.clone()
    labels[:, : ids.shape[1] - 4] = -100
    loss = model(ids, VisualBatch(prompt.images), position_ids=prompt.position_ids[:, None], labels=labels).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.llm.named_parameters() if p.requires_grad)


def test_qwen3vl_folder_missing_a_deepstack_merger_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    from vlmkit.hf.folder import ExportError

    folder = save_qwen3vl(tmp_path / "hf")
    state = load_file(str(folder / "model.safetensors"))
    missing = next(k for k in state if "deepstack_merger_list.1.linear_fc2.weight" in k)
    del state[missing]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"deepstack_merger_list\.1\.linear_fc2\.weight"):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
