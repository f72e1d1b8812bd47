"""A Qwen2-VL-family vlmkit model against transformers' Qwen2VLForConditionalGeneration with the
same weights: M-RoPE positions equal `get_rope_index`, logits on an image+text prompt equal the
reference's, and batched greedy decoding (with the decode delta) equals one-by-one decoding."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmkit.config import ModelConfig
from vlmkit.data.formats import Message
from vlmkit.generate import GenerationConfig, generate
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch

torch.set_num_threads(1)

VISION = {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 4, "temporal_patch_size": 2,
          "spatial_merge_size": 2}
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 4096}


def tiny_qwen2vl(seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    cfg = ModelConfig.model_validate({
        "vision": {"name": "qwen2-vit", "config": VISION},
        "connector": {"name": "pixel-shuffle", "options": {"ratio": 0.5, "norm": "pre", "norm_eps": 1e-6, "hidden_size": 128}},
        "llm": {"name": "qwen2-vl-text-random", "config": TEXT},
        "processor": {"name": "qwen2vl", "image_size": 32,
                      "options": {"patch_size": 4, "merge_size": 2, "min_pixels": 256, "max_pixels": 16384}},
    })
    model = VisionLanguageModel.build(cfg, pretrained=False).eval()
    with torch.no_grad():  # random, non-trivial norm weights so a mis-mapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.uniform_(0.5, 1.5)
    return model


def reference_model(model: VisionLanguageModel):
    from vlmkit.families.qwen2_vl.hf import qwen2_vl_reference

    return qwen2_vl_reference(model).eval()


def encode(model, images, text="Describe <image> briefly."):
    proc = build_chat_processor(model, 4096)
    return proc.encode_prompt([Message("user", text)], images)


IMAGES = [Image.new("RGB", (72, 40), (200, 30, 30)), Image.new("RGB", (24, 56), (20, 90, 200))]


@pytest.mark.parametrize("size", [(72, 40), (24, 56), (100, 100)])
def test_positions_and_logits_match_transformers(size):
    model = tiny_qwen2vl()
    ref = reference_model(model)
    g = torch.Generator().manual_seed(1)
    image = Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())
    prompt = encode(model, [image])
    ids = prompt.input_ids[None]
    is_image = (ids == model.image_token_id).int()
    grid = torch.tensor([prompt.images[0].views[0].grid])
    theirs_pos, theirs_delta = ref.model.get_rope_index(ids, is_image, image_grid_thw=grid)
    assert torch.equal(prompt.position_ids, theirs_pos[:, 0])
    assert prompt.rope_delta == int(theirs_delta)
    with torch.no_grad():
        ours = model(ids, visuals=VisualBatch(prompt.images), position_ids=prompt.position_ids[:, None]).logits
        expected = ref(input_ids=ids, pixel_values=prompt.images[0].pixel_values, image_grid_thw=grid,
                       mm_token_type_ids=is_image).logits[..., : model.vocab_size]
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


def test_batched_greedy_equals_one_by_one_with_decode_delta():
    model = tiny_qwen2vl(seed=3)
    prompts = [encode(model, [IMAGES[0]]), encode(model, [IMAGES[1]], "Which colour? <image>"),
               encode(model, IMAGES, "<image> and <image>: same colour?")]
    assert len({p.rope_delta for p in prompts}) > 1  # rows decode with different deltas
    cfg = GenerationConfig(max_new_tokens=6)
    alone = [generate(model, [p], cfg)[0] for p in prompts]
    assert generate(model, prompts, cfg) == alone
    # The reference decodes the same tokens for the first prompt.
    ref = reference_model(model)
    p = prompts[0]
    grid = torch.tensor([p.images[0].views[0].grid])
    out = ref.generate(input_ids=p.input_ids[None], pixel_values=p.images[0].pixel_values, image_grid_thw=grid,
                       mm_token_type_ids=(p.input_ids[None] == model.image_token_id).int(), max_new_tokens=6,
                       do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out[0, p.input_ids.shape[0]:].tolist()[: len(alone[0])] == alone[0]
