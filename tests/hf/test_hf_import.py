"""`vlmkit import-hf` per family against transformers on tiny random folders saved with
`save_pretrained`: the same input ids and visual-token counts as the family's HF processor,
pixel values within docs/preprocessing.md's tolerance, logits within 1e-4 (fp32), the same
greedy tokens; export back to the family's format returns the same tensors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmkit.data.formats import Message
from vlmkit.generate import GenerationConfig, generate
from vlmkit.hf.registry import export_hf, import_hf
from vlmkit.processing import build_chat_processor
from vlmkit.checkpoint import load_checkpoint
from vlmkit.processing.base import VisualBatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _hf_folders import save_qwen2vl  # noqa: E402

torch.set_num_threads(1)

# docs/preprocessing.md: resized pixels within 3 of 255 intensity levels of the reference.
PIXEL_TOLERANCE = 3 / 255


def noise(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    # Smooth noise (upscaled) keeps the resize comparison meaningful; white noise would test aliasing.
    small = (torch.rand(max(1, h // 4), max(1, w // 4), 3, generator=g) * 255).byte().numpy()
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


@pytest.fixture(scope="module", params=["2", "2.5"], ids=["qwen2-vl", "qwen2.5-vl"])
def qwen(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("qwen2vl")
    folder = save_qwen2vl(root / "hf", version=request.param)
    ckpt = import_hf(folder, root / "vlmkit")
    model, _ = load_checkpoint(ckpt)
    return folder, ckpt, model


def _first_stop(tokens: list[int], stops: set[int]) -> list[int]:
    return tokens[: next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]


# ---- Qwen2-VL --------------------------------------------------------------------------------


def _qwen_reference_ids(folder, images, text):
    """What transformers' Qwen2VLProcessor produces (it cannot be built here without
    torchvision): the chat template over a content list, each <|image_pad|> repeated
    grid_t*grid_h*grid_w / merge^2 times, from the HF image processor's own grids."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    proc = Qwen2VLImageProcessorPil.from_pretrained(folder, local_files_only=True)
    out = proc(images=images, return_tensors="pt")
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    rendered = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    parts = rendered.split("<|image_pad|>")
    counts = [int(g.prod()) // proc.merge_size**2 for g in out["image_grid_thw"]]
    expanded = parts[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, parts[1:]))
    return tok(expanded, add_special_tokens=False, return_tensors="pt")["input_ids"][0], out, counts


@pytest.mark.parametrize("sizes", [[(72, 40)], [(24, 56)], [(100, 100)], [(60, 30), (30, 90)]])
def test_qwen2vl_import_ids_pixels_logits_and_greedy_match_transformers(qwen, sizes):
    from transformers import AutoModelForImageTextToText

    folder, _, model = qwen
    images = [noise(w, h, seed=i + 1) for i, (w, h) in enumerate(sizes)]
    text = "Describe the picture."
    ref_ids, ref_pixels, counts = _qwen_reference_ids(folder, images, text)
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>" * len(images) + text)], images)
    assert prompt.input_ids.tolist() == ref_ids.tolist()
    assert [model.count_image_tokens(im) for im in prompt.images] == counts
    grids = torch.tensor([im.views[0].grid for im in prompt.images])
    assert torch.equal(grids, ref_pixels["image_grid_thw"])
    ours_pixels = torch.cat([im.pixel_values for im in prompt.images])
    std = torch.tensor(model.config.processor.std).repeat_interleave(ours_pixels.shape[1] // 3)
    assert ((ours_pixels - ref_pixels["pixel_values"]).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6

    ref = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    assert type(ref).__name__ in ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    ids = prompt.input_ids[None]
    is_image = (ids == model.image_token_id).int()
    inputs = {"input_ids": ids, "pixel_values": ours_pixels, "image_grid_thw": grids, "mm_token_type_ids": is_image}
    with torch.no_grad():
        ours = model(ids, visuals=VisualBatch(prompt.images), position_ids=prompt.position_ids[:, None]).logits
        theirs = ref(**inputs).logits
    assert ours.shape == theirs.shape  # no vocabulary growth on import
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)

    expected = generate(model, [prompt], GenerationConfig(max_new_tokens=8))[0]
    out = ref.generate(**inputs, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    assert _first_stop(out, set(ref.generation_config.eos_token_id if isinstance(ref.generation_config.eos_token_id, list)
                                else [ref.generation_config.eos_token_id])) == expected


def test_qwen2vl_import_reads_processor_settings_and_tokenizer(qwen):
    _, ckpt, model = qwen
    p = model.config.processor
    assert p.name == "qwen2vl"
    assert model.config.vision.name in ("qwen2-vit", "qwen2.5-vit")
    assert p.options["min_pixels"] == 256 and p.options["max_pixels"] == 16384
    assert tuple(p.mean) == pytest.approx((0.5, 0.4, 0.3)) and tuple(p.std) == pytest.approx((0.25, 0.3, 0.35))
    assert model.config.image_token == "<|image_pad|>"
    assert "<|vision_start|>" in model.tokenizer.chat_template
    assert model.uses_mrope
    # The decoder is a pretrained part loaded from llm/, not repeated in the weights file.
    assert model.pretrained_parts == {"llm"} and (ckpt / "llm" / "model.safetensors").is_file()


def test_qwen2vl_export_then_import_returns_the_same_tensors(qwen, tmp_path):
    _, _, model = qwen
    exported = export_hf(model, tmp_path / "hf")
    assert (exported / "preprocessor_config.json").is_file() and (exported / "chat_template.jinja").is_file()
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    _assert_same_tensors(model, again)
    assert again.config.processor == model.config.processor


def _assert_same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ---- vlmkit tokens on an imported checkpoint ------------------------------------------------


def _check_tokens_command(ckpt, model):
    import json as _json

    from typer.testing import CliRunner

    from vlmkit.cli import app

    for w, h in [(72, 40), (24, 90)]:
        result = CliRunner().invoke(app, ["tokens", "--checkpoint", str(ckpt), "--size", f"{w}x{h}", "--json"])
        assert result.exit_code == 0, result.output
        report = _json.loads(result.output)
        prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>\nWhat?")], [noise(w, h, seed=1)])
        assert report["visual_tokens"] == int((prompt.input_ids == model.image_token_id).sum())
        assert report["context"] == 4096


def test_tokens_command_reads_the_imported_qwen_processor(qwen):
    _check_tokens_command(qwen[1], qwen[2])


def test_qwen2vl_folder_in_the_released_layout_imports(tmp_path):
    """Released Qwen2-VL folders (e.g. Qwen2-VL-2B-Instruct) keep the text settings flat at the top
    of config.json, M-RoPE in `rope_scaling`, `in_chans`, a tied head stored once; transformers 5
    reads that layout, and so must the import."""
    import json as _json

    from safetensors.torch import load_file, save_file
    from transformers import Qwen2VLForConditionalGeneration

    folder = save_qwen2vl(tmp_path / "hf", seed=4)
    cfg = _json.loads((folder / "config.json").read_text())
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
    (folder / "config.json").write_text(_json.dumps(legacy))
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
