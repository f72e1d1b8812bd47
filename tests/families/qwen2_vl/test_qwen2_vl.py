"""`vlmkit import-hf` for Qwen2-VL and Qwen2.5-VL on tiny random folders saved with
`save_pretrained`: two images in one prompt against transformers (ids, counts, grids, pixels,
logits, greedy), the processor settings and tokenizer it reads, export back returning the same
tensors, `vlmkit tokens` on the imported checkpoint, and a folder in the released layout.
Single-image ids, pixels, logits and greedy tokens: tests/families/test_hf_parity.py."""

from __future__ import annotations

import json

import pytest
import torch
from _parity import check_against_transformers, first_stop, noise
from qwen2_vl_folder import check_against_processor, qwen_reference_ids, save_qwen2vl

from vlmkit.checkpoint import load_checkpoint
from vlmkit.core.types import Message
from vlmkit.hf.registry import export_hf, import_hf
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["2", "2.5"], ids=["qwen2-vl", "qwen2.5-vl"])
def qwen(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("qwen2vl")
    folder = save_qwen2vl(root / "hf", version=request.param)
    ckpt = import_hf(folder, root / "vlmkit")
    model, _ = load_checkpoint(ckpt)
    return folder, ckpt, model


def test_qwen2vl_two_images_ids_pixels_logits_and_greedy_match_transformers(qwen):
    from transformers import AutoModelForImageTextToText

    folder, _, model = qwen
    images = [noise(w, h, seed=i + 1) for i, (w, h) in enumerate([(60, 30), (30, 90)])]
    text = "Describe the picture."
    ref_ids, ref_pixels, counts = qwen_reference_ids(folder, images, text)
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>" * len(images) + text)], images)
    assert prompt.input_ids.tolist() == ref_ids.tolist()
    kwargs = check_against_processor(ref_pixels, counts, prompt, model)

    ref = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    assert type(ref).__name__ in ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    ids = prompt.input_ids[None]
    check_against_transformers(model, ref, prompt, ids[0], kwargs, positions=True)


def test_batched_greedy_generation_takes_the_lean_decoder_and_matches_transformers(qwen, monkeypatch):
    """Three prompts of different lengths (left padded, each row with its own M-RoPE delta) on
    the lean decoder give transformers' batched greedy `generate` tokens, row by row."""
    from transformers import AutoModelForImageTextToText

    from vlmkit.generate import GenerationConfig, generate
    from vlmkit.model import fast_decode

    folder, _, model = qwen
    built, lean_decoder = [], fast_decode.LeanDecoder
    monkeypatch.setattr(fast_decode, "LeanDecoder", lambda *a, **k: built.append(1) or lean_decoder(*a, **k))
    chat = build_chat_processor(model, 4096)
    sizes, questions = [(72, 40), (24, 56), (100, 60)], ["Describe the picture.", "What?", "Which colour is it, mostly?"]
    prompts = [chat.encode_prompt([Message("user", "<image>" + q)], [noise(w, h, seed=i + 3)])
               for i, ((w, h), q) in enumerate(zip(sizes, questions))]
    ours = generate(model, prompts, GenerationConfig(max_new_tokens=10))
    assert built == [1]  # the lean decoder ran the batch

    T = max(len(p.input_ids) for p in prompts)
    pad = model.tokenizer.pad_token_id
    ids = torch.stack([torch.cat([torch.full((T - len(p.input_ids),), pad), p.input_ids]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(T - len(p.input_ids), dtype=torch.long), torch.ones(len(p.input_ids), dtype=torch.long)])
                        for p in prompts])
    ref = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    kwargs = {"pixel_values": torch.cat([p.images[0].pixel_values for p in prompts]),
              "image_grid_thw": torch.tensor([p.images[0].views[0].grid for p in prompts]),
              "mm_token_type_ids": (ids == model.image_token_id).int()}
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=mask, **kwargs, max_new_tokens=10, do_sample=False, pad_token_id=pad)
    eos = ref.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    assert [first_stop(row, stops) for row in out[:, T:].tolist()] == ours
    assert all(ours), "every row produced tokens"


def test_qwen2vl_import_reads_processor_settings_and_tokenizer(qwen):
    _, ckpt, model = qwen
    p = model.config.processor
    assert p.name == "qwen2vl"
    assert model.config.vision.name in ("qwen2-vit", "qwen2.5-vit")
    assert p.options["min_pixels"] == 256 and p.options["max_pixels"] == 16384
    assert tuple(p.mean) == pytest.approx((0.5, 0.4, 0.3)) and tuple(p.std) == pytest.approx((0.25, 0.3, 0.35))
    assert model.config.image_token == "<|image_pad|>"
    assert "<|vision_start|>" in model.tokenizer.chat_template
    assert model.position_rule == "mrope"
    # The decoder is a pretrained part loaded from llm/, not repeated in the weights file.
    assert model.pretrained_parts == {"llm"} and (ckpt / "llm" / "model.safetensors").is_file()


def test_qwen2vl_export_then_import_returns_the_same_tensors(qwen, tmp_path):
    _, _, model = qwen
    exported = export_hf(model, tmp_path / "hf")
    assert (exported / "preprocessor_config.json").is_file() and (exported / "chat_template.jinja").is_file()
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert again.config.processor == model.config.processor


def test_tokens_command_reads_the_imported_qwen_processor(qwen):
    from typer.testing import CliRunner

    from vlmkit.cli import app

    _, ckpt, model = qwen
    for w, h in [(72, 40), (24, 90)]:
        result = CliRunner().invoke(app, ["tokens", "--checkpoint", str(ckpt), "--size", f"{w}x{h}", "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>\nWhat?")], [noise(w, h, seed=1)])
        assert report["visual_tokens"] == int((prompt.input_ids == model.image_token_id).sum())
        assert report["context"] == 4096


def test_qwen2vl_folder_in_the_released_layout_imports(tmp_path):
    """Released Qwen2-VL folders (e.g. Qwen2-VL-2B-Instruct) keep the text settings flat at the top
    of config.json, M-RoPE in `rope_scaling`, `in_chans`, a tied head stored once; transformers 5
    reads that layout, and so must the import."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2VLForConditionalGeneration

    folder = save_qwen2vl(tmp_path / "hf", seed=4)
    cfg = json.loads((folder / "config.json").read_text())
    text, vision = cfg.pop("text_config"), cfg.pop("vision_config")
    legacy = {k: v for k, v in text.items() if k not in ("model_type", "rope_parameters", "layer_types", "dtype")}
    legacy |= {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "tie_word_embeddings": True,
               "rope_theta": 10000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
               "image_token_id": cfg["image_token_id"], "video_token_id": cfg["video_token_id"],
               "vision_start_token_id": cfg["vision_start_token_id"], "vision_end_token_id": cfg["vision_end_token_id"],
               "transformers_version": "4.41.2", "torch_dtype": "float32",
               "vision_config": {"depth": vision["depth"], "embed_dim": vision["embed_dim"], "mlp_ratio": vision["mlp_ratio"],
                                 "num_heads": vision["num_heads"], "in_chans": 3, "hidden_size": vision["hidden_size"],
                                 "patch_size": 4, "spatial_merge_size": 2, "spatial_patch_size": 4, "temporal_patch_size": 2}}
    (folder / "config.json").write_text(json.dumps(legacy))
    state = load_file(str(folder / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(folder / "model.safetensors"))

    model, _ = load_checkpoint(import_hf(folder, tmp_path / "vlmkit"))
    ref = Qwen2VLForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    assert ref.config.tie_word_embeddings
    image = noise(64, 40, seed=2)
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>What?")], [image])
    ids = prompt.input_ids[None]
    with torch.no_grad():
        ours = model(ids, visuals=VisualBatch(prompt.images), position_ids=prompt.position_ids[:, None]).logits
        theirs = ref(input_ids=ids, pixel_values=prompt.images[0].pixel_values,
                     image_grid_thw=torch.tensor([prompt.images[0].views[0].grid]),
                     mm_token_type_ids=(ids == model.image_token_id).int()).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
