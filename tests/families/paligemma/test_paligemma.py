"""`vlmkit import-hf` of PaliGemma / PaliGemma 2 against transformers on tiny random folders:
multi-image prompts (ids, pixels, logits under the prefix-LM mask, greedy tokens), training-time
prefix/suffix masks, and the export round trip. One image: tests/families/test_hf_parity.py
(`paligemma_folder.PARITY`)."""

from __future__ import annotations

import pytest
import torch
from _parity import first_stop, noise
from paligemma_folder import check_inputs_and_rule, paligemma_processor, save_paligemma, save_paligemma2

from vlmkit.checkpoint import load_checkpoint
from vlmkit.core.types import Message, Sample
from vlmkit.generate import GenerationConfig, generate
from vlmkit.hf.registry import export_hf, import_hf, verify_hf_export
from vlmkit.model.vlm import lm_head
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["gemma", "gemma2"], ids=["paligemma", "paligemma2"])
def paligemma(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("paligemma")
    folder = (save_paligemma2 if request.param == "gemma2" else save_paligemma)(root / "hf")
    model, _ = load_checkpoint(import_hf(folder, root / "vlmkit"))
    return folder, model


def _check(model, folder, images, text, ours_text):
    from transformers import PaliGemmaForConditionalGeneration

    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", ours_text)], images)
    inputs = check_inputs_and_rule(model, folder, prompt, images, text, "prefix")
    ref = PaliGemmaForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(prompt.input_ids[None], visuals=VisualBatch(prompt.images)).logits
        theirs = ref(**inputs).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)

    expected = generate(model, [prompt], GenerationConfig(max_new_tokens=8))[0]
    out = ref.generate(**inputs, max_new_tokens=8, do_sample=False)[0, prompt.input_ids.shape[0]:].tolist()
    eos = ref.generation_config.eos_token_id
    assert first_stop(out, set(eos if isinstance(eos, list) else [eos])) == expected


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
    hf_inputs = paligemma_processor(folder)(images=[[image]], text="<image>caption", suffix="a red box", return_tensors="pt")
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
