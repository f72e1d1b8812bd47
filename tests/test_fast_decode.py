"""The lean decoder against transformers' own Llama/Qwen2 modules: same hidden states for a
left-padded prefill and for each cached decode step, and its weight copies follow the weights."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from vlmkit.model import fast_decode

SMALL = dict(hidden_size=48, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
             vocab_size=300, max_position_embeddings=256)


def _models():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**SMALL, rope_theta=500.0)).eval()
    qwen = Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=False)).eval()  # q/k/v biases
    scaled = LlamaForCausalLM(LlamaConfig(**SMALL, rope_scaling={"rope_type": "linear", "factor": 2.0})).eval()
    return {"llama": llama, "qwen2": qwen, "llama-linear-rope": scaled}


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama-linear-rope"])
def test_prefill_and_decode_steps_match_hf(name):
    llm = _models()[name]
    assert fast_decode.supports(llm)
    B, T, steps = 3, 9, 4
    lengths = [9, 6, 2]  # left padded
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ids = torch.randint(0, SMALL["vocab_size"], (B, T))
    full_mask = torch.cat([mask, torch.ones(B, steps, dtype=torch.long)], dim=1)
    embeds = llm.get_input_embeddings()(ids)
    with torch.no_grad():
        lean = fast_decode.LeanDecoder(llm, B, T + steps, full_mask, embeds.dtype, embeds.device)
        before = embeds.clone()
        ours = lean.logits(lean.forward_last(embeds, positions))
        assert torch.equal(embeds, before)  # the caller's embeddings are never written
        cache = DynamicCache()
        out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        torch.testing.assert_close(ours, out.logits[:, -1], atol=2e-5, rtol=1e-4)
        hf_mask, next_pos = mask, positions[:, -1:] + 1
        for _ in range(steps):
            token = ours.argmax(-1)
            step = llm.get_input_embeddings()(token[:, None])
            ours = lean.logits(lean.forward_last(step, next_pos))
            hf_mask = torch.cat([hf_mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
            out = llm(inputs_embeds=step, attention_mask=hf_mask, position_ids=next_pos, cache=cache, use_cache=True)
            torch.testing.assert_close(ours, out.logits[:, -1], atol=2e-5, rtol=1e-4)
            next_pos = next_pos + 1


def test_decode_layout_copies_only_wide_weights_and_follow_updates():
    llm = _models()["llama"]
    weights = fast_decode.decode_weights(llm)
    layer, module = weights.layers[0], llm.model.layers[0]
    # Wider-than-tall weights get a column-major copy with equal values; the rest are the weights themselves.
    assert not layer.gate.weight.is_contiguous() and torch.equal(layer.gate.weight, module.mlp.gate_proj.weight)
    assert layer.down.weight.data_ptr() == module.mlp.down_proj.weight.data_ptr()
    assert fast_decode.decode_weights(llm) is weights  # cached while nothing changes
    with torch.no_grad():
        module.mlp.gate_proj.weight.add_(1.0)  # an optimizer step, in place
    fresh = fast_decode.decode_weights(llm)
    assert fresh is not weights and torch.equal(fresh.layers[0].gate.weight, module.mlp.gate_proj.weight)


def test_hooked_or_unsupported_models_use_the_hf_path():
    llm = _models()["llama"]
    handle = llm.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert not fast_decode.supports(llm)
    handle.remove()
    assert fast_decode.supports(llm)
