"""Every connector family: shapes, which parts get gradients, a tiny model that learns, checkpoint
round trips, build-time errors, and parity with the reference implementations in transformers."""

from __future__ import annotations

import pytest
import torch

from _tiny import FAMILIES, answer_accuracy, tiny_config, tiny_model, toy_batch
from vlmkit.model.connectors import build_connector
from vlmkit.model.connectors.pixel_shuffle import pixel_shuffle
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.checkpoint import model_state
from vlmkit.processing.base import VisualBatch

EXPECTED_TOKENS = {"linear": 64, "mlp": 64, "pixel-shuffle": 16, "pooling": 16, "qformer": 4, "perceiver": 4, "native": 64, "patch-embed": 64, "cross-attn": 1}
PREFIX = [f for f in FAMILIES if f != "cross-attn"]


@pytest.mark.parametrize("family", PREFIX)
def test_shapes_and_token_count(family):
    model = tiny_model(family)
    feats = model.vision_features(torch.randn(3, 3, 32, 32))
    assert feats.shape[:2] == (3, 64)
    out = model.connector.tokens(feats, model.image_grid)
    assert out.shape == (3, EXPECTED_TOKENS[family], 32)
    assert model.tokens_per_image == EXPECTED_TOKENS[family] == model.connector.num_tokens(model.image_grid)


STAGES = {"align": ["connector"], "instruct": ["connector", "llm"], "full": ["vision", "connector", "llm"]}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("stage", list(STAGES))
def test_gradients_reach_exactly_the_trained_parts(family, stage):
    model = tiny_model(family)
    trainable = list(STAGES[stage]) + (["cross_attention"] if family == "cross-attn" else [])
    model.set_trainable(trainable)
    model.train()
    ids, labels, pixels = toy_batch(model)
    model(ids, visuals=VisualBatch.of_pixels(pixels), labels=labels).loss.backward()
    for part, module in model.parts().items():
        for name, p in module.named_parameters():
            if p.numel() == 0:  # the parameter-free patchify tower's dtype anchor
                continue
            if part in trainable:
                assert p.grad is not None, f"{part}.{name} got no gradient in stage {stage}"
            else:
                assert p.grad is None and not p.requires_grad, f"frozen {part}.{name} got a gradient"
    if family != "cross-attn":
        # Every projection weight gets signal, not just a zero tensor.
        assert any(p.grad.abs().sum() > 0 for p in model.connector.parameters() if p.grad is not None)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_model_learns_toy_task(family):
    model = tiny_model(family)
    trainable = ["connector", "llm"] + (["cross_attention"] if family == "cross-attn" else [])
    model.set_trainable(trainable)
    model.train()
    ids, labels, pixels = toy_batch(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(300):
        loss = model(ids, visuals=VisualBatch.of_pixels(pixels), labels=labels).loss
        first = first if first is not None else loss.item()
        if loss.item() < 0.03:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.03 < first
    # The answer depends on the image alone (same prompt for all classes), so 100% means the
    # image reached the LLM through the connector.
    assert answer_accuracy(model, ids, labels, pixels) == 1.0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpoint_round_trip_gives_identical_outputs(family, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model(family, seed=0).eval()
    with torch.no_grad():
        for p in model.parameters():  # move off the init so a loading bug cannot hide behind it
            p.add_(0.01 * torch.randn_like(p))
    ids, labels, pixels = toy_batch(model)
    save_file(model_state(model, list(model.parts())), str(tmp_path / "w.safetensors"))
    other = tiny_model(family, seed=1).eval()
    state = load_file(str(tmp_path / "w.safetensors"))
    for part, module in other.parts().items():
        sub = {k[len(part) + 1 :]: v for k, v in state.items() if k.startswith(part + ".")}
        module.load_state_dict(sub, strict=True)
    with torch.no_grad():
        a = model(ids, visuals=VisualBatch.of_pixels(pixels)).logits
        b = other(ids, visuals=VisualBatch.of_pixels(pixels)).logits
    assert torch.equal(a, b)


# ---- build-time errors ---------------------------------------------------------------------

def _config_with(family: str, **options):
    cfg = tiny_config(family)
    cfg.connector.options = {**cfg.connector.options, **options}
    return cfg


def test_pixel_shuffle_ratio_that_does_not_fit_the_grid():
    cfg = _config_with("pixel-shuffle", ratio=1 / 3)  # 8x8 grid, 3x3 blocks
    with pytest.raises(ValueError, match=r"8x8 feature grid.*not divisible by 3"):
        VisionLanguageModel.build(cfg, pretrained=False)


def test_pixel_shuffle_ratio_that_is_not_one_over_an_integer():
    with pytest.raises(ValueError, match="not 1/integer"):
        VisionLanguageModel.build(_config_with("pixel-shuffle", ratio=0.3), pretrained=False)


def test_pooling_kernel_that_does_not_tile_the_grid():
    with pytest.raises(ValueError, match="kernel 3 does not tile the 8x8"):
        VisionLanguageModel.build(_config_with("pooling", kernel=3), pretrained=False)


def test_qformer_width_that_does_not_divide_into_heads():
    with pytest.raises(ValueError, match="width 30 is not divisible by 4 attention heads"):
        VisionLanguageModel.build(_config_with("qformer", hidden_size=30, heads=4), pretrained=False)


def test_perceiver_kv_heads_that_do_not_divide_heads():
    with pytest.raises(ValueError, match="not a multiple of 3 key/value heads"):
        build_connector("perceiver", 32, 32, {"heads": 4, "kv_heads": 3})


def test_unknown_option_is_rejected_with_its_name():
    with pytest.raises(ValueError, match="num_querys"):
        build_connector("qformer", 32, 32, {"num_querys": 8})


# ---- parity with transformers' reference modules ---------------------------------------------

def test_pixel_shuffle_matches_internvl_and_idefics3():
    from transformers import Idefics3Config, InternVLConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
    from transformers.models.internvl.modeling_internvl import InternVLModel

    x = torch.randn(2, 64, 5)
    ours = pixel_shuffle(x, (8, 8), 2)
    internvl = InternVLModel.pixel_shuffle(None, x.view(2, 8, 8, 5), scale_factor=0.5).reshape(2, 16, 20)
    assert torch.equal(ours, internvl)
    idefics3 = Idefics3Connector.pixel_shuffle(None, x, scale_factor=2)
    assert torch.equal(ours, idefics3)
    # SmolVLM's 3x3 merge (27x27 SigLIP grid -> 81 tokens).
    y = torch.randn(1, 81, 4)
    assert torch.equal(pixel_shuffle(y, (9, 9), 3), Idefics3Connector.pixel_shuffle(None, y, scale_factor=3))
    del InternVLConfig, Idefics3Config


def _hf_qformer_key(key: str) -> str | None:
    """Our Q-Former parameter name -> Blip2QFormerModel's."""
    import re

    if key.startswith(("query_tokens", "proj.")):
        return None
    key = key.replace("layers.", "encoder.layer.")
    for ours, theirs in (("self_attn", "attention"), ("cross_attn", "crossattention")):
        key = re.sub(rf"{ours}\.attn\.(q|k|v)_proj", lambda m: f"{theirs}.attention." + {"q": "query", "k": "key", "v": "value"}[m.group(1)], key)
        key = key.replace(f"{ours}.attn.o_proj", f"{theirs}.output.dense").replace(f"{ours}.norm", f"{theirs}.output.LayerNorm")
    key = key.replace("text_ffn.fc1", "intermediate.dense").replace("text_ffn.fc2", "output.dense").replace("text_ffn.norm", "output.LayerNorm")
    key = key.replace("ffn.fc1", "intermediate_query.dense").replace("ffn.fc2", "output_query.dense").replace("ffn.norm", "output_query.LayerNorm")
    return key


def test_qformer_matches_blip2_qformer_numerically():
    from transformers import Blip2QFormerConfig
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel

    hf_cfg = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, encoder_hidden_size=24, cross_attention_frequency=2)
    torch.manual_seed(0)
    hf = Blip2QFormerModel(hf_cfg).eval()
    ours = build_connector(
        "qformer", 24, 40,
        {"num_queries": 6, "hidden_size": 32, "layers": 3, "heads": 4, "intermediate_size": 64, "cross_attention_frequency": 2},
    ).eval()
    hf_state = hf.state_dict()
    mapped = {}
    for key in ours.state_dict():
        theirs = _hf_qformer_key(key)
        if theirs is not None:
            mapped[key] = hf_state[theirs]
    assert len(mapped) == len(hf_state), sorted(set(hf_state) - {_hf_qformer_key(k) for k in mapped})
    ours.load_state_dict(mapped, strict=False)
    queries = ours.query_tokens.detach()
    feats = torch.randn(2, 10, 24)
    with torch.no_grad():
        expected = hf(query_embeds=queries.expand(2, -1, -1), encoder_hidden_states=feats).last_hidden_state
        got = ours.query_states(feats)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_perceiver_matches_idefics2_connector_param_count():
    from transformers import Idefics2Config
    from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector

    cfg = Idefics2Config(
        vision_config={"hidden_size": 24},
        text_config={"hidden_size": 64, "intermediate_size": 96, "rms_norm_eps": 1e-5, "model_type": "mistral"},
        perceiver_config={"resampler_n_latents": 8, "resampler_depth": 2, "resampler_n_heads": 4, "resampler_head_dim": 12, "num_key_value_heads": 2},
    )
    hf = Idefics2Connector(cfg)
    ours = build_connector(
        "perceiver", 24, 64,
        {"latents": 8, "layers": 2, "heads": 4, "head_dim": 12, "kv_heads": 2, "width": 64, "ffn": "swiglu", "norm": "rmsnorm",
         "input_proj": "swiglu", "input_proj_hidden": 96, "project_output": False},
    )
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(hf)


def test_native_connector_takes_any_image_size():
    model = tiny_model("native")
    for h, w in ((32, 32), (16, 48), (64, 24)):
        feats = model.vision(torch.randn(1, 3, h, w))
        grid = model.vision.grid_hw(h, w)
        assert model.connector(feats, grid).shape == (1, grid[0] * grid[1], 32)


def test_patchify_keeps_every_pixel():
    model = tiny_model("patch-embed")
    pixels = torch.randn(2, 3, 32, 32)
    patches = model.vision(pixels)
    assert patches.shape == (2, 64, 48)
    # Patch (row 1, col 2), pixel (0, 0) of each channel.
    torch.testing.assert_close(patches[:, 1 * 8 + 2, :3], pixels[:, :, 4, 8])
    assert sum(p.numel() for p in model.vision.parameters()) == 0
