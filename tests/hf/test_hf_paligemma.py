"""`vlmkit import-hf` of PaliGemma / PaliGemma 2 against transformers on tiny random folders:
the same ids and visual-token count as PaliGemmaProcessor (with SiglipImageProcessorPil),
pixels within docs/preprocessing.md's tolerance, logits within 1e-4 under the prefix-LM mask,
the same greedy tokens, multi-image prompts, training-time prefix/suffix masks, and the export
round trip."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmkit.data.formats import Message, Sample
from vlmkit.generate import GenerationConfig, generate
from vlmkit.hf.registry import export_hf, import_hf, verify_hf_export
from vlmkit.model.attention import attention_rule
from vlmkit.model.vlm import lm_head
from vlmkit.processing import build_chat_processor
from vlmkit.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _hf_folders_gemma import save_paligemma  # noqa: E402

torch.set_num_threads(1)
PIXEL_TOLERANCE = 3 / 255


def noise(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    small = (torch.rand(max(1, h // 4), max(1, w // 4), 3, generator=g) * 255).byte().numpy()
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


@pytest.fixture(scope="module", params=["gemma", "gemma2"], ids=["paligemma", "paligemma2"])
def paligemma(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("paligemma")
    text = {"model_type": "gemma2", "sliding_window": 12, "layer_types": ["sliding_attention", "full_attention"],
            "query_pre_attn_scalar": 16} if request.param == "gemma2" else None
    folder = save_paligemma(root / "hf", text=text)
    model, _ = load_checkpoint(import_hf(folder, root / "vlmkit"))
    return folder, model


def _processor(folder):
    from transformers import AutoTokenizer, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return PaliGemmaProcessor.from_pretrained(folder, local_files_only=True,
                                              image_processor=SiglipImageProcessorPil.from_pretrained(folder, local_files_only=True),
                                              tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))


def _first_stop(tokens, stops):
    return tokens[: next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]


def _check(model, folder, images, text, ours_text):
    from transformers import PaliGemmaForConditionalGeneration

    hf_inputs = _processor(folder)(images=[images], text=text, return_tensors="pt")
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", ours_text)], images)
    assert prompt.input_ids.tolist() == hf_inputs["input_ids"][0].tolist()
    assert sum(model.count_image_tokens(im) for im in prompt.images) == int((hf_inputs["input_ids"] == model.image_token_id).sum())
    ours_pixels = torch.cat([im.pixel_values for im in prompt.images])
    std = torch.tensor(model.config.processor.std)[:, None, None]
    assert ((ours_pixels - hf_inputs["pixel_values"]).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6

    ref = PaliGemmaForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    inputs = dict(hf_inputs, pixel_values=ours_pixels)
    inputs.pop("labels", None)
    with torch.no_grad():
        ours = model(prompt.input_ids[None], images=prompt.images).logits
        theirs = ref(**inputs).logits
        model.attention_rule = attention_rule("causal")
        try:
            causal = model(prompt.input_ids[None], images=prompt.images).logits
        finally:
            model.attention_rule = attention_rule("prefix")
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (ours - causal).abs().max() > 1e-3  # the prefix mask matters: a causal reading differs

    expected = generate(model, [prompt], GenerationConfig(max_new_tokens=8))[0]
    out = ref.generate(**inputs, max_new_tokens=8, do_sample=False)[0, prompt.input_ids.shape[0]:].tolist()
    eos = ref.generation_config.eos_token_id
    assert _first_stop(out, set(eos if isinstance(eos, list) else [eos])) == expected
    return float((ours - theirs).abs().max())


@pytest.mark.parametrize("size", [(20, 20), (72, 40), (24, 90)])
def test_paligemma_import_ids_pixels_logits_and_greedy_match_transformers(paligemma, size):
    folder, model = paligemma
    assert model.config.attention == "prefix"
    image = noise(*size, seed=5)
    _check(model, folder, [image], "<image>What is shown?", "<image>What is shown?")


def test_paligemma_two_images_in_one_prompt_match_transformers(paligemma):
    folder, model = paligemma
    images = [noise(40, 30, seed=1), noise(30, 60, seed=2)]
    _check(model, folder, images, "<image><image>Compare them.", "<image><image>Compare them.")


def test_paligemma_training_forward_matches_transformers_prefix_and_suffix(paligemma):
    """A training sample: the prompt is bidirectional, the answer causal (PaliGemmaProcessor's
    `suffix` -> token_type_ids 1), through vlmkit's collate and loss path."""
    from transformers import PaliGemmaForConditionalGeneration

    from vlmkit.data.collate import collate
    from vlmkit.train.losses import decoder_hidden

    folder, model = paligemma
    image = noise(50, 30, seed=9)
    hf_inputs = _processor(folder)(images=[[image]], text="<image>caption", suffix="a red box", return_tensors="pt")
    chat = build_chat_processor(model, 4096)
    sample = chat.encode(Sample(id="s", messages=[Message("user", "<image>caption"), Message("assistant", "a red box")], images=[image]))
    assert sample.input_ids.tolist() == hf_inputs["input_ids"][0].tolist()
    assert sample.labels.tolist() == hf_inputs["labels"][0].tolist()
    batch = collate([sample], model.tokenizer.pad_token_id)
    ref = PaliGemmaForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = lm_head(model.llm)(decoder_hidden(model, batch))
        theirs = ref(input_ids=hf_inputs["input_ids"], pixel_values=sample.images[0].pixel_values,
                     token_type_ids=hf_inputs["token_type_ids"]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_paligemma_export_then_import_returns_the_same_tensors(paligemma, tmp_path):
    _, model = paligemma
    exported = export_hf(model, tmp_path / "hf")
    assert verify_hf_export(model, exported) < 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert again.config.processor == model.config.processor
    assert again.config.attention == "prefix"
