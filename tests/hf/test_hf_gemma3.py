"""`vlmkit import-hf` of Gemma 3 against transformers on a tiny random folder: the same ids and
visual-token count as Gemma3Processor (with Gemma3ImageProcessorPil, pan-and-scan off), pixels
within docs/preprocessing.md's tolerance, logits within 1e-4 with each image's tokens attending
to each other (and a sliding window shorter than the prompt), the same greedy tokens, two images
in one prompt, and the export round trip."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmkit.data.formats import Message
from vlmkit.generate import GenerationConfig, generate
from vlmkit.hf.registry import export_hf, import_hf, verify_hf_export
from vlmkit.model.attention import attention_rule
from vlmkit.processing import build_chat_processor
from vlmkit.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _hf_folders_gemma import save_gemma3  # noqa: E402

torch.set_num_threads(1)
PIXEL_TOLERANCE = 3 / 255


def noise(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    small = (torch.rand(max(1, h // 4), max(1, w // 4), 3, generator=g) * 255).byte().numpy()
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    folder = save_gemma3(root / "hf")
    model, _ = load_checkpoint(import_hf(folder, root / "vlmkit"))
    return folder, model


def _processor(folder):
    from transformers import AutoTokenizer, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    return Gemma3Processor.from_pretrained(folder, local_files_only=True,
                                           image_processor=Gemma3ImageProcessorPil.from_pretrained(folder, local_files_only=True),
                                           tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))


def _first_stop(tokens, stops):
    return tokens[: next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]


def _check(model, folder, images, question):
    from transformers import Gemma3ForConditionalGeneration

    hf_proc = _processor(folder)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    text = hf_proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    hf_inputs = hf_proc(images=[images], text=text, return_tensors="pt")
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>" * len(images) + question)], images)
    assert prompt.input_ids.tolist() == hf_inputs["input_ids"][0].tolist()
    assert sum(model.count_image_tokens(im) for im in prompt.images) == int((hf_inputs["input_ids"] == model.image_token_id).sum())
    ours_pixels = torch.cat([im.pixel_values for im in prompt.images])
    std = torch.tensor(model.config.processor.std)[:, None, None]
    assert ((ours_pixels - hf_inputs["pixel_values"]).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6

    ref = Gemma3ForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    inputs = dict(hf_inputs, pixel_values=ours_pixels)
    with torch.no_grad():
        ours = model(prompt.input_ids[None], images=prompt.images).logits
        theirs = ref(**inputs).logits
        model.attention_rule = attention_rule("causal")
        try:
            causal = model(prompt.input_ids[None], images=prompt.images).logits
        finally:
            model.attention_rule = attention_rule("image")
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (ours - causal).abs().max() > 1e-3  # the bidirectional image blocks matter

    expected = generate(model, [prompt], GenerationConfig(max_new_tokens=8))[0]
    out = ref.generate(**inputs, max_new_tokens=8, do_sample=False)[0, prompt.input_ids.shape[0]:].tolist()
    eos = ref.generation_config.eos_token_id
    assert _first_stop(out, set(eos if isinstance(eos, list) else [eos])) == expected


@pytest.mark.parametrize("size", [(20, 20), (72, 40), (24, 90)])
def test_gemma3_import_ids_pixels_logits_and_greedy_match_transformers(gemma3, size):
    folder, model = gemma3
    assert model.config.attention == "image"
    _check(model, folder, [noise(*size, seed=5)], "What is shown?")


def test_gemma3_two_images_in_one_prompt_match_transformers(gemma3):
    folder, model = gemma3
    _check(model, folder, [noise(40, 30, seed=1), noise(30, 60, seed=2)], "Compare them.")


def test_gemma3_pan_and_scan_folder_is_refused(tmp_path):
    import json
    import shutil

    from vlmkit.hf.folder import ExportError

    folder = save_gemma3(tmp_path / "hf", seed=1)
    cfg_path = folder / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["image_processor"]["do_pan_and_scan"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="pan-and-scan"):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    shutil.rmtree(folder)


def test_gemma3_export_then_import_returns_the_same_tensors(gemma3, tmp_path):
    _, model = gemma3
    exported = export_hf(model, tmp_path / "hf")
    assert verify_hf_export(model, exported) < 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert again.config.processor == model.config.processor
    assert again.config.attention == "image"
