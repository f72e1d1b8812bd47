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
    models = {"llama": llama, "qwen2": qwen, "llama-linear-rope": scaled}
    with torch.no_grad():  # trained norms are not all ones; the decoder folds them into weights
        for model in models.values():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
    return models


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


def test_mrope_decoder_prefill_and_decode_steps_match_hf():
    """Qwen2-VL's M-RoPE decoder: (3, B, T) positions that differ per axis (an image block, a
    row past the sequence length as a video's timestamps give), then decode steps from each row's
    largest position + 1 on all three axes, as transformers' Qwen2-VL decodes."""
    from transformers import Qwen2VLTextConfig

    from vlmkit.families.qwen2_vl.model import MRopeCausalLM

    torch.manual_seed(0)
    cfg = Qwen2VLTextConfig(**SMALL, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    llm = MRopeCausalLM(cfg).eval()
    assert fast_decode.supports(llm)
    B, T, steps = 2, 8, 3
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0  # left padded
    positions = torch.ones(3, B, T, dtype=torch.long)
    # Row 0: two text tokens, a 1x2x3 image block, text; row 1: text, then timestamps far apart.
    positions[:, 0] = torch.tensor([[0, 1, 2, 2, 2, 2, 2, 2], [0, 1, 2, 2, 2, 3, 3, 3], [0, 1, 2, 3, 4, 2, 3, 4]])
    positions[:, 0, -2:] = torch.tensor([5, 6])
    positions[:, 1, 3:] = torch.tensor([[0, 1, 40, 80, 81], [0, 1, 2, 3, 81], [0, 1, 3, 2, 81]])
    ids = torch.randint(0, SMALL["vocab_size"], (B, T))
    embeds = llm.get_input_embeddings()(ids)
    with torch.no_grad():
        lean = fast_decode.LeanDecoder(llm, B, T + steps, torch.cat([mask, torch.ones(B, steps, dtype=torch.long)], 1), embeds.dtype,
                                       embeds.device, max_position=int(positions.max()) + steps)
        ours = lean.logits(lean.forward_last(embeds, positions))
        cache = DynamicCache()
        out = llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        torch.testing.assert_close(ours, llm.lm_head(out.last_hidden_state[:, -1]), atol=2e-5, rtol=1e-4)
        hf_mask, next_pos = mask, positions[..., -1:] + 1
        for _ in range(steps):
            step = llm.get_input_embeddings()(ours.argmax(-1)[:, None])
            ours = lean.logits(lean.forward_last(step, next_pos))
            hf_mask = torch.cat([hf_mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
            out = llm.model(inputs_embeds=step, attention_mask=hf_mask, position_ids=next_pos, cache=cache, use_cache=True)
            torch.testing.assert_close(ours, llm.lm_head(out.last_hidden_state[:, -1]), atol=2e-5, rtol=1e-4)
            next_pos = next_pos + 1


def test_decode_layout_copies_only_wide_weights_and_follow_updates():
    llm = _models()["llama"]
    weights = fast_decode.decode_weights(llm)
    layer, module = weights.layers[0], llm.model.layers[0]
    inner = module.mlp.gate_proj.out_features
    folded = module.mlp.gate_proj.weight * module.post_attention_layernorm.weight
    # Row-major maps for prompts and batches; the one-row layout only once batch 1 asks for it.
    assert layer.gate_up.weight.is_contiguous() and torch.equal(layer.gate_up.weight[:inner], folded)
    assert layer.gate_up.gemv is None
    fast_decode.LeanDecoder(llm, 1, 4, torch.ones(1, 4), torch.float32, "cpu")
    # Wider-than-tall weights get a column-major copy with equal values; the rest are the weights themselves.
    assert not layer.gate_up.gemv.is_contiguous() and torch.equal(layer.gate_up.gemv, layer.gate_up.weight)
    assert layer.down.gemv is None and layer.down.weight.data_ptr() == module.mlp.down_proj.weight.data_ptr()  # taller than wide
    x = torch.randn(1, 1, SMALL["hidden_size"])
    torch.testing.assert_close(layer.gate_up(x), x @ layer.gate_up.weight.t(), atol=1e-5, rtol=1e-5)
    assert fast_decode.decode_weights(llm) is weights  # cached while nothing changes
    with torch.no_grad():
        module.mlp.gate_proj.weight.add_(1.0)  # an optimizer step, in place
    fresh = fast_decode.decode_weights(llm)
    folded = module.mlp.gate_proj.weight * module.post_attention_layernorm.weight
    assert fresh is not weights and torch.equal(fresh.layers[0].gate_up.weight[:inner], folded)
    assert fresh.layers[0].gate_up.gemv is None  # the new weights' copy is made on the next batch-1 call


def test_bfloat16_keeps_the_norm_scale_unfolded_and_matches_hf():
    llm = _models()["llama"].to(torch.bfloat16)
    assert fast_decode.decode_weights(llm).layers[0].input_norm.weight is not None
    B, T = 2, 7
    mask = torch.ones(B, T, dtype=torch.long)
    embeds = llm.get_input_embeddings()(torch.randint(0, SMALL["vocab_size"], (B, T)))
    with torch.no_grad():
        lean = fast_decode.LeanDecoder(llm, B, T, mask, embeds.dtype, embeds.device)
        ours = lean.forward_last(embeds, torch.arange(T).expand(B, T))
        theirs = llm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, -1]
    torch.testing.assert_close(ours, theirs, atol=3e-2, rtol=3e-2)


def test_hooked_or_unsupported_models_use_the_hf_path():
    llm = _models()["llama"]
    handle = llm.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert not fast_decode.supports(llm)
    handle.remove()
    assert fast_decode.supports(llm)


def test_compiled_decode_step_gives_the_eager_tokens_and_is_reused_across_calls():
    """The torch.compile'd single-token step (a CUDA graph on GPUs) against the eager lean path,
    on a left-padded batch; a second call with other prompt lengths in the same length bucket
    reuses the compiled graph instead of compiling again."""
    from torch._dynamo.utils import counters

    from _serve_util import tiny_model

    from vlmkit.data.formats import Message
    from vlmkit.generate import GenerationConfig, generate

    model, processor = tiny_model()

    def prompts(questions):
        return [processor.encode_prompt([Message("user", q)], []) for q in questions]

    first, second = prompts(["a question", "hi", "something longer here?"]), prompts(["why?", "tell me more, please", "ok"])
    eager = [generate(model, p, GenerationConfig(max_new_tokens=10)) for p in (first, second)]
    counters.clear()
    compiled = generate(model, first, GenerationConfig(max_new_tokens=10, compile=True))
    frames_after_first = counters["stats"]["unique_graphs"]
    buffers = fast_decode.decode_weights(model.llm).static_buffers[1]
    assert compiled == eager[0]
    assert generate(model, second, GenerationConfig(max_new_tokens=10, compile=True)) == eager[1]
    assert frames_after_first >= 1 and counters["stats"]["unique_graphs"] == frames_after_first
    # Same shape: the same buffers (a CUDA graph keeps its input addresses), cleared between calls.
    assert fast_decode.decode_weights(model.llm).static_buffers[1] is buffers


def test_compiled_decoding_pads_batches_to_a_power_of_two_and_reports_only_real_rows(monkeypatch):
    from _serve_util import tiny_model

    import vlmkit.generate as gen
    from vlmkit.data.formats import Message

    model, processor = tiny_model()
    prompts = [processor.encode_prompt([Message("user", q)], []) for q in ("one", "two words", "and three more")]
    eager = gen.generate(model, prompts, gen.GenerationConfig(max_new_tokens=6))
    monkeypatch.setattr(gen, "PAD_BATCH_FOR_GRAPHS", {"cpu"})
    polled = []
    steps = list(gen.generate_steps(model, prompts, gen.GenerationConfig(max_new_tokens=6, compile=True),
                                    cancelled=lambda i: polled.append(i) or False))
    assert all(len(s.tokens) == 3 for s in steps) and max(polled) == 2
    assert fast_decode.decode_weights(model.llm).static_buffers[0][0] == 4  # three rows ran as four
    assert [[s.tokens[i] for s in steps if s.tokens[i] is not None] for i in range(3)] == eager


def test_llm_with_lora_adapters_uses_the_hf_path():
    # peft's LoRA layer is not an nn.Linear: the lean decoder, which reads `.weight`, would decode
    # with the base weights alone and ignore the adapters (it did, and a LoRA-trained model then
    # answered from its base weights until it was saved, merged and reloaded).
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    llm = copy.deepcopy(_models()["llama"])
    assert fast_decode.supports(llm)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), llm)
    assert not fast_decode.supports(llm)
