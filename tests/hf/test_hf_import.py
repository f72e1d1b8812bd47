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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _hf_folders import save_idefics3, save_internvl, save_llava_next  # noqa: E402

torch.set_num_threads(1)

# docs/preprocessing.md: resized pixels within 3 of 255 intensity levels of the reference.
PIXEL_TOLERANCE = 3 / 255


def noise(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    # Smooth noise (upscaled) keeps the resize comparison meaningful; white noise would test aliasing.
    small = (torch.rand(max(1, h // 4), max(1, w // 4), 3, generator=g) * 255).byte().numpy()
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_next")
    folder = save_llava_next(root / "hf")
    ckpt = import_hf(folder, root / "vlmkit")
    model, _ = load_checkpoint(ckpt)
    return folder, ckpt, model


def _first_stop(tokens: list[int], stops: set[int]) -> list[int]:
    return tokens[: next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]


def _assert_same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ---- LLaVA-NeXT ------------------------------------------------------------------------------


def _llava_next_processor(folder):
    from transformers import AutoTokenizer, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    # The PIL image processor: the default one needs torchvision.
    return LlavaNextProcessor.from_pretrained(folder, local_files_only=True,
                                              image_processor=LlavaNextImageProcessorPil.from_pretrained(folder, local_files_only=True),
                                              tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))


@pytest.mark.parametrize("size", [(72, 40), (24, 90), (64, 64), (100, 30)])
def test_llava_next_import_ids_pixels_logits_and_greedy_match_transformers(llava_next, size):
    from transformers import LlavaNextForConditionalGeneration

    folder, _, model = llava_next
    image = noise(*size, seed=7)
    hf_proc = _llava_next_processor(folder)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = hf_proc.apply_chat_template(conversation, add_generation_prompt=True)
    hf_inputs = hf_proc(images=image, text=text, return_tensors="pt")
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>\nWhat is shown?")], [image])
    assert prompt.input_ids.tolist() == hf_inputs["input_ids"][0].tolist()
    assert model.count_image_tokens(prompt.images[0]) == int((hf_inputs["input_ids"] == model.image_token_id).sum())
    ours_pixels = prompt.images[0].pixel_values
    theirs_pixels = hf_inputs["pixel_values"][0, : ours_pixels.shape[0]]
    std = torch.tensor(model.config.processor.std)[:, None, None]
    assert ((ours_pixels - theirs_pixels).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6

    ref = LlavaNextForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    inputs = dict(hf_inputs, pixel_values=ours_pixels[None])
    with torch.no_grad():
        ours = model(prompt.input_ids[None], images=prompt.images).logits
        theirs = ref(**inputs).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)

    expected = generate(model, [prompt], GenerationConfig(max_new_tokens=8))[0]
    out = ref.generate(**inputs, max_new_tokens=8, do_sample=False)[0, prompt.input_ids.shape[0]:].tolist()
    eos = ref.generation_config.eos_token_id
    assert _first_stop(out, set(eos if isinstance(eos, list) else [eos])) == expected


def test_llava_next_siglip_tower_imports_with_equal_logits(tmp_path):
    from transformers import LlavaNextForConditionalGeneration

    folder = save_llava_next(tmp_path / "hf", tower="siglip", seed=2)
    model, _ = load_checkpoint(import_hf(folder, tmp_path / "vlmkit"))
    image = noise(50, 90, seed=3)
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>\nWhat?")], [image])
    ref = LlavaNextForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        ours = model(prompt.input_ids[None], images=prompt.images).logits
        theirs = ref(input_ids=prompt.input_ids[None], pixel_values=prompt.images[0].pixel_values[None],
                     image_sizes=torch.tensor([[90, 50]])).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_llava_next_export_then_import_returns_the_same_tensors(llava_next, tmp_path):
    _, _, model = llava_next
    exported = export_hf(model, tmp_path / "hf")
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    _assert_same_tensors(model, again)
    assert again.config.processor == model.config.processor


# ---- Idefics3 / SmolVLM ----------------------------------------------------------------------


def test_idefics3_export_then_import_returns_the_same_tensors(idefics3, tmp_path):
    _, model = idefics3
    again, _ = load_checkpoint(import_hf(export_hf(model, tmp_path / "hf"), tmp_path / "again"))
    _assert_same_tensors(model, again)
    assert again.config.processor == model.config.processor


@pytest.fixture(scope="module")
def idefics3(tmp_path_factory):
    root = tmp_path_factory.mktemp("idefics3")
    folder = save_idefics3(root / "hf")
    model, _ = load_checkpoint(import_hf(folder, root / "vlmkit"))
    return folder, model


@pytest.mark.parametrize("size", [(20, 20), (72, 40), (24, 90), (100, 100)])
def test_idefics3_import_ids_pixels_logits_and_greedy_match_transformers(idefics3, size):
    from transformers import AutoTokenizer, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    folder, model = idefics3
    image = noise(*size, seed=5)
    hf_proc = Idefics3Processor.from_pretrained(folder, local_files_only=True,
                                                image_processor=Idefics3ImageProcessorPil.from_pretrained(folder, local_files_only=True),
                                                tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = hf_proc.apply_chat_template(conversation, add_generation_prompt=True)
    hf_inputs = hf_proc(images=[image], text=text, return_tensors="pt")
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>What is shown?")], [image])
    assert prompt.input_ids.tolist() == hf_inputs["input_ids"][0].tolist()
    assert model.count_image_tokens(prompt.images[0]) == int((hf_inputs["input_ids"] == model.image_token_id).sum())
    ours_pixels = prompt.images[0].pixel_values
    std = torch.tensor(model.config.processor.std)[:, None, None]
    assert ((ours_pixels - hf_inputs["pixel_values"][0]).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6

    ref = Idefics3ForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    inputs = dict(hf_inputs, pixel_values=ours_pixels[None])
    with torch.no_grad():
        ours = model(prompt.input_ids[None], images=prompt.images).logits
        theirs = ref(**inputs).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    expected = generate(model, [prompt], GenerationConfig(max_new_tokens=8))[0]
    out = ref.generate(**inputs, max_new_tokens=8, do_sample=False)[0, prompt.input_ids.shape[0]:].tolist()
    eos = ref.generation_config.eos_token_id
    assert _first_stop(out, set(eos if isinstance(eos, list) else [eos])) == expected


# ---- InternVL --------------------------------------------------------------------------------


def test_internvl_export_then_import_returns_the_same_tensors(internvl, tmp_path):
    from vlmkit.hf.registry import verify_hf_export

    _, model = internvl
    exported = export_hf(model, tmp_path / "hf")
    assert verify_hf_export(model, exported) < 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    _assert_same_tensors(model, again)
    assert again.config.processor == model.config.processor


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl")
    folder = save_internvl(root / "hf")
    model, _ = load_checkpoint(import_hf(folder, root / "vlmkit"))
    return folder, model


def _internvl_reference_ids(folder, image, text):
    """What transformers' InternVLProcessor produces (it cannot be built here without torchvision,
    which its video processor needs): the chat template over a content list, each <IMG_CONTEXT>
    replaced by <img> + image_seq_length * num_patches context tokens + </img>, with num_patches
    from GotOcr2's (PIL) image processor."""
    import json as _json

    from transformers import AutoTokenizer
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    proc = GotOcr2ImageProcessorPil.from_pretrained(folder, local_files_only=True)
    out = proc(images=[image], return_tensors="pt")
    seq = _json.loads((Path(folder) / "processor_config.json").read_text())["image_seq_length"]
    content = [{"type": "image"}, {"type": "text", "text": text}]
    rendered = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    n = int(out["num_patches"][0])
    rendered = rendered.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * (seq * n) + "</img>", 1)
    return tok(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"][0], out


@pytest.mark.parametrize("size", [(20, 20), (72, 40), (24, 90), (100, 100)])
def test_internvl_import_ids_pixels_logits_and_greedy_match_transformers(internvl, size):
    from transformers import InternVLForConditionalGeneration

    folder, model = internvl
    image = noise(*size, seed=9)
    ref_ids, ref_pixels = _internvl_reference_ids(folder, image, "What is shown?")
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>\nWhat is shown?")], [image])
    assert prompt.input_ids.tolist() == ref_ids.tolist()
    assert model.count_image_tokens(prompt.images[0]) == int((ref_ids == model.image_token_id).sum())
    ours_pixels = prompt.images[0].pixel_values
    std = torch.tensor(model.config.processor.std)[:, None, None]
    assert ((ours_pixels - ref_pixels["pixel_values"]).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6

    ref = InternVLForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    inputs = {"input_ids": prompt.input_ids[None], "pixel_values": ours_pixels}
    with torch.no_grad():
        ours = model(prompt.input_ids[None], images=prompt.images).logits
        theirs = ref(**inputs).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    expected = generate(model, [prompt], GenerationConfig(max_new_tokens=8))[0]
    out = ref.generate(**inputs, max_new_tokens=8, do_sample=False)[0, prompt.input_ids.shape[0]:].tolist()
    eos = ref.generation_config.eos_token_id
    assert _first_stop(out, set(eos if isinstance(eos, list) else [eos])) == expected


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


def test_tokens_command_reads_the_imported_llava_next_processor(llava_next):
    _check_tokens_command(llava_next[1], llava_next[2])


def test_llava_next_two_images_in_one_prompt_match_transformers(llava_next):
    from transformers import LlavaNextForConditionalGeneration

    folder, _, model = llava_next
    images = [noise(72, 40, seed=11), noise(30, 80, seed=12)]
    hf_proc = _llava_next_processor(folder)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]
    hf_inputs = hf_proc(images=images, text=hf_proc.apply_chat_template(conversation, add_generation_prompt=True), return_tensors="pt")
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>\n<image>\nSame?")], images)
    assert prompt.input_ids.tolist() == hf_inputs["input_ids"][0].tolist()
    views = hf_inputs["pixel_values"].shape[1]
    pixels = torch.zeros_like(hf_inputs["pixel_values"])
    for i, im in enumerate(prompt.images):
        pixels[i, : im.pixel_values.shape[0]] = im.pixel_values
    assert views == max(im.pixel_values.shape[0] for im in prompt.images)
    ref = LlavaNextForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        ours = model(prompt.input_ids[None], images=prompt.images).logits
        theirs = ref(**dict(hf_inputs, pixel_values=pixels)).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_idefics3_two_images_in_one_prompt_match_transformers(idefics3):
    from transformers import AutoTokenizer, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    folder, model = idefics3
    images = [noise(72, 40, seed=13), noise(20, 20, seed=14)]
    hf_proc = Idefics3Processor.from_pretrained(folder, local_files_only=True,
                                                image_processor=Idefics3ImageProcessorPil.from_pretrained(folder, local_files_only=True),
                                                tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]
    hf_inputs = hf_proc(images=[images], text=hf_proc.apply_chat_template(conversation, add_generation_prompt=True), return_tensors="pt")
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image><image>Same?")], images)
    assert prompt.input_ids.tolist() == hf_inputs["input_ids"][0].tolist()
    pixels = torch.cat([im.pixel_values for im in prompt.images])[None]
    assert pixels.shape == hf_inputs["pixel_values"].shape
    ref = Idefics3ForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        ours = model(prompt.input_ids[None], images=prompt.images).logits
        theirs = ref(**dict(hf_inputs, pixel_values=pixels)).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_internvl_two_images_in_one_prompt_match_transformers(internvl):
    import json as _json

    from transformers import AutoTokenizer, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    folder, model = internvl
    images = [noise(72, 40, seed=15), noise(30, 80, seed=16)]
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    counts = GotOcr2ImageProcessorPil.from_pretrained(folder, local_files_only=True)(images=images, return_tensors="pt")["num_patches"]
    seq = _json.loads((Path(folder) / "processor_config.json").read_text())["image_seq_length"]
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]
    rendered = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    for n in counts:  # InternVLProcessor expands the placeholders in order
        rendered = rendered.replace("<IMG_CONTEXT>\n", "<img>" + "<IMG_X>" * (seq * int(n)) + "</img>\n", 1)
    ref_ids = tok(rendered.replace("<IMG_X>", "<IMG_CONTEXT>"), add_special_tokens=False)["input_ids"]
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>\n<image>\nSame?")], images)
    assert prompt.input_ids.tolist() == ref_ids
    ref = InternVLForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        ours = model(prompt.input_ids[None], images=prompt.images).logits
        theirs = ref(input_ids=prompt.input_ids[None], pixel_values=torch.cat([im.pixel_values for im in prompt.images])).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
