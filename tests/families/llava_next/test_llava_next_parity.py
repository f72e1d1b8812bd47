"""The AnyRes family against transformers' LlavaNextForConditionalGeneration with the same
weights: same image-token count per image (pinpoints, unpadding, newlines) and the same logits,
for images of different sizes and aspect ratios in one batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmkit.config import load_config
from vlmkit.data.collate import collate
from vlmkit.data.formats import Message
from vlmkit.families.llava_next.hf import llava_next, llava_next_inputs
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.processing import build_chat_processor

torch.set_num_threads(1)
RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "families" / "anyres.yaml"


@pytest.mark.parametrize("sizes", [[(72, 40), (24, 90)], [(64, 64), (100, 30)]])
def test_logits_match_transformers_llava_next(sizes):
    torch.manual_seed(0)
    model = VisionLanguageModel.build(load_config(RECIPE).model, pretrained=False).eval()
    ref = llava_next(model).eval()
    proc = build_chat_processor(model, 4096)
    g = torch.Generator().manual_seed(1)
    images = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for w, h in sizes]
    encoded = [proc.encode_prompt([Message("user", "<image>\nWhat is this?")], [im]) for im in images]
    inputs = llava_next_inputs(encoded)
    batch = collate(encoded, pad_id=0)
    with torch.no_grad():
        ours = model(batch.input_ids, batch.visuals, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
        theirs = ref(**inputs).logits[..., : model.vocab_size]
    # Left (ours, generation layout) vs right padding (theirs): compare each row's real tokens.
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        torch.testing.assert_close(ours[i, :n], theirs[i, :n], atol=2e-5, rtol=1e-4)
