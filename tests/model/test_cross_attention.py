"""Gated cross-attention fusion: exact no-op at init, placement by path lookup in any HF
decoder, image features kept out of the self-attention stack, causal visibility of images."""

from __future__ import annotations

import pytest
import torch

from _tiny import TINY_LLM, tiny_config, toy_batch
from vlmkit.model.cross_attention import GatedCrossAttentionBlock, CrossAttentionOptions, insertion_points
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.processing.base import VisualBatch

LLMS = {
    "llama": TINY_LLM,
    "qwen2": TINY_LLM,
    "gpt_neox": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256},
}


def build(model_type="llama", every=1, seed=0):
    cfg = tiny_config("cross-attn")
    cfg.llm.model_type = model_type
    cfg.llm.config = LLMS[model_type]
    cfg.connector.options = {"cross_attention": {"every": every, "heads": 2}}
    torch.manual_seed(seed)
    return VisionLanguageModel.build(cfg, pretrained=False).eval()


def open_gates(model, value=0.7):
    with torch.no_grad():
        for block in model.cross_attention.blocks:
            block.attn_gate.fill_(value)
            block.ffn_gate.fill_(value)


@pytest.mark.parametrize("model_type", list(LLMS))
def test_llm_outputs_exactly_unchanged_at_init(model_type):
    model = build(model_type)
    assert model.fusion.name == "cross-attention" and "cross_attention" in model.parts()
    ids, _, pixels = toy_batch(model)
    with torch.no_grad():
        fused = model(ids, visuals=VisualBatch.of_pixels(pixels)).logits
        marker = model.cross_attention.image_marker.expand(ids.shape[0], 1, -1)
        plain = model.llm(inputs_embeds=model.fill_slots(ids, marker)).logits
    assert torch.equal(fused, plain)
    # ... and the blocks really ran: with open gates the same call differs.
    open_gates(model)
    with torch.no_grad():
        assert not torch.allclose(model(ids, visuals=VisualBatch.of_pixels(pixels)).logits, plain)


def test_blocks_sit_before_every_kth_layer_found_by_path():
    assert insertion_points(40, 5) == [4, 9, 14, 19, 24, 29, 34, 39]
    assert insertion_points(32, 4) == [3, 7, 11, 15, 19, 23, 27, 31]
    model = build(every=2)
    assert model.cross_attention.points == [1]
    assert len(model.cross_attention.blocks) == 1
    # The LLM's own modules are untouched: its state dict has no cross-attention keys.
    assert not any("cross" in k or "attn_gate" in k or "marker" in k for k in model.llm.state_dict())
    with pytest.raises(ValueError, match="inserts no block"):
        cfg = tiny_config("cross-attn")
        cfg.connector.options = {"cross_attention": {"every": 5}}
        VisionLanguageModel.build(cfg, pretrained=False)


def test_image_features_never_enter_the_self_attention_stack():
    model = build()
    open_gates(model)
    ids, _, pixels = toy_batch(model)
    seen = []
    layer0 = model.llm.model.layers[0]
    handle = layer0.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).shape), with_kwargs=True)
    with torch.no_grad():
        model(ids, visuals=VisualBatch.of_pixels(pixels))
    handle.remove()
    # One marker slot per image; the connector's 64 memory tokens are only keys/values.
    assert model.tokens_per_image == 1 and model.memory_tokens_per_image == 64
    assert seen == [torch.Size([3, ids.shape[1], 32])]


def test_text_before_the_image_marker_does_not_see_the_image():
    model = build()
    open_gates(model)
    tok = model.tokenizer
    text = tok.encode("ab", add_special_tokens=False)
    ids = torch.tensor([text + [model.image_token_id] + text])
    a, b = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        la, lb = model(ids, visuals=VisualBatch.of_pixels(a)).logits, model(ids, visuals=VisualBatch.of_pixels(b)).logits
    torch.testing.assert_close(la[:, :2], lb[:, :2], atol=0, rtol=0)
    assert not torch.allclose(la[:, 3:], lb[:, 3:])


def test_two_images_in_one_sample_and_a_text_only_sample():
    model = build()
    open_gates(model)
    m = model.image_token_id
    ids = torch.tensor([[m, 40, m, 41], [42, 43, 44, 45]])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(ids, visuals=VisualBatch.of_pixels(pixels)).logits
        alone = model(ids[1:]).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1:], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="2 image markers but 1 images"):
        model(ids, visuals=VisualBatch.of_pixels(pixels[:1]))


def test_kv_cache_decoding_matches_full_forward():
    model = build()
    open_gates(model)
    ids, _, pixels = toy_batch(model)
    with torch.no_grad():
        full = model(ids, visuals=VisualBatch.of_pixels(pixels)).logits
        pre = model(ids[:, :-1], visuals=VisualBatch.of_pixels(pixels), use_cache=True)
        step = model(ids[:, -1:], past_key_values=pre.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


def test_gates_start_closed_and_learn():
    model = build()
    model.set_trainable(["cross_attention", "connector"])
    model.train()
    ids, labels, pixels = toy_batch(model)
    gates = [b.attn_gate for b in model.cross_attention.blocks]
    assert all(float(g.detach()) == 0.0 for g in gates)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(ids, visuals=VisualBatch.of_pixels(pixels), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(float(g.detach()) != 0.0 for g in gates)
    assert all(p.grad is None for p in model.llm.parameters())


def test_block_matches_mllama_cross_attention_layer_param_count():
    from transformers import MllamaTextConfig
    from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer

    hf_cfg = MllamaTextConfig(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2, cross_attention_layers=[0])
    hf = MllamaCrossAttentionDecoderLayer(hf_cfg, layer_idx=0)
    opts = CrossAttentionOptions(heads=8, kv_heads=2, ffn="swiglu", ffn_hidden=96, norm="rmsnorm", qk_norm=True)
    ours = GatedCrossAttentionBlock(64, 64, opts, heads=8)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(hf)


def test_inputs_embeds_path_used_by_generation_matches_forward():
    """generate()'s lean path calls inputs_embeds and then runs the decoder itself."""
    from transformers import DynamicCache

    from vlmkit.model.vlm import run_decoder

    model = build()
    open_gates(model)
    ids, _, pixels = toy_batch(model)
    with torch.no_grad():
        full = model(ids, visuals=VisualBatch.of_pixels(pixels)).logits
        embeds = model.inputs_embeds(ids[:, :-1], VisualBatch.of_pixels(pixels))
        cache = DynamicCache()
        run_decoder(model.llm.base_model, embeds, None, None, cache, use_cache=True)
        step = model.llm.get_input_embeddings()(ids[:, -1:])
        pos = torch.full((ids.shape[0], 1), ids.shape[1] - 1)
        out = run_decoder(model.llm.base_model, step, None, pos, cache, use_cache=True)
        last = model.llm.get_output_embeddings()(out.last_hidden_state[:, -1])
        # A text-only prompt afterwards clears the image memory.
        model.inputs_embeds(ids[:, 4:], None)
        assert model.cross_attention._memory is None
    torch.testing.assert_close(last, full[:, -1], atol=1e-5, rtol=1e-5)
