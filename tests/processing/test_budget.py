"""Token budget: counts from the family processors, costs from the preset's LLM shape, the CLI."""

from __future__ import annotations

import copy
import json

import pytest
from typer.testing import CliRunner

from vlmkit.cli import app
from vlmkit.presets import names as preset_names
from vlmkit.presets.budget import get_preset, image_budget, lecture_table

runner = CliRunner()


def test_lecture_table_rows_reproduced():
    rows = {r["model"]: r for r in lecture_table()}
    assert rows["BLIP-2 / InstructBLIP"]["reference"].startswith("32 /")
    assert rows["LLaVA-1.5 (336px)"]["reference"].startswith("576 /")
    assert rows["AnyRes example (1024x1024)"]["reference"].startswith("4352 / 1088")
    assert "10496" in rows["InternVL2-76B"]["reference"] and rows["InternVL2-76B"]["agrees"] is False
    assert rows["Qwen2-VL"]["reference"].startswith("4-16384")
    assert rows["Pixtral-12B"]["reference"].startswith("1024 at 512 px / 4096")
    assert rows["Llama 3.2 Vision 11B"]["reference"].startswith("1601 / 6404")


def test_budget_numbers_follow_the_formulas():
    b = image_budget("llava-1.5-7b", 640, 480)
    n, L = 576, 32
    layer = 2 * 4096 * 4096 + 2 * 4096 * 4096 + 3 * 4096 * 11008
    assert b.visual_tokens == n and b.sequence_tokens == n
    assert b.prefill_flops == 2 * n * layer * L + 2 * L * n * n * 4096
    assert b.kv_cache_bytes == n * L * 2 * 4096 * 2  # 288 MiB in bf16
    assert b.context_share == pytest.approx(576 / 4096)
    # GQA shrinks the cache by heads / kv_heads.
    q = image_budget("qwen2-vl-7b", 448, 448, context=1000)
    assert q.visual_tokens == 256 and q.sequence_tokens == 258
    assert q.kv_cache_bytes == 258 * 28 * 2 * 4 * 128 * 2
    assert q.context_share == pytest.approx(0.258)


def test_cross_attention_budget_counts_states_not_sequence_tokens():
    b = image_budget("llama-3.2-vision-11b", 600, 400)
    assert b.sequence_tokens == 1 and b.fusion == "cross-attention"
    assert b.parts["grid"] == [1, 2] and b.visual_tokens == 2 * 1601
    assert b.kv_cache_bytes == 4 * 1601 * 8 * 2 * 8 * 128 * 2


def test_context_overflow_is_noted():
    b = image_budget("internvl2-76b-40tiles", 8000, 1000, context=8192)
    assert b.sequence_tokens > 8192
    assert any("exceeds" in n for n in b.notes)


def test_cli_json_reports_total_as_integer():
    res = runner.invoke(app, ["tokens", "--preset", "llava-next-7b", "--size", "1024x768", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["visual_tokens"] == 2340 and isinstance(data["visual_tokens"], int)
    assert data["parts"]["grid"] == [2, 2] and data["parts"]["resized"] == [672, 504]
    assert data["prefill_flops"] > 0 and data["kv_cache_bytes"] > 0


def test_cli_human_table_and_errors(tmp_path):
    res = runner.invoke(app, ["tokens", "--table"])
    assert res.exit_code == 0 and "4352 / 1088" in res.output and "Llama 3.2 Vision" in res.output
    res = runner.invoke(app, ["tokens", "-p", "pixtral-12b", "-s", "512x512", "--context", "2048"])
    assert res.exit_code == 0 and "1,024" in res.output and "of 2,048" in res.output
    assert runner.invoke(app, ["tokens", "-p", "nope", "-s", "10x10"]).exit_code != 0
    assert runner.invoke(app, ["tokens", "-p", "blip2", "-s", "10by10"]).exit_code != 0
    res = runner.invoke(app, ["tokens", "-p", "qwen2-vl-7b", "-s", "1x300"])
    assert res.exit_code == 2 and "aspect ratio" in res.output
    png = tmp_path / "t.png"
    assert runner.invoke(app, ["tokens", "--plot", str(png)]).exit_code == 0
    assert png.stat().st_size > 1000


def test_every_preset_answers_for_odd_sizes():
    for name in preset_names():
        for w, h in [(1, 1), (33, 7), (4000, 3000)]:
            b = image_budget(name, w, h)
            assert b.visual_tokens > 0 and b.sequence_tokens > 0


# The LLM shapes budget.py used to keep in its own table (name, layers, width, heads, kv heads,
# head_dim, FFN, context, gated MLP, cross-attention layers). They are now read off each preset's
# real-shape LLM; these are the published configs they must still agree with.
FORMER_TABLE = {
    "blip2": ("OPT-2.7B", 32, 2560, 32, 32, 80, 10240, 2048, False, 0),
    "llava-1.5-7b": ("Vicuna-7B (Llama-2-7B)", 32, 4096, 32, 32, 128, 11008, 4096, True, 0),
    "llava-1.5-13b": ("Vicuna-13B (Llama-2-13B)", 40, 5120, 40, 40, 128, 13824, 4096, True, 0),
    "llava-next-7b": ("Vicuna-7B (Llama-2-7B)", 32, 4096, 32, 32, 128, 11008, 4096, True, 0),
    "internvl2-76b": ("Hermes-2-Theta-Llama-3-70B", 80, 8192, 64, 8, 128, 28672, 8192, True, 0),
    "internvl2-76b-40tiles": ("Hermes-2-Theta-Llama-3-70B", 80, 8192, 64, 8, 128, 28672, 8192, True, 0),
    "qwen2-vl-7b": ("Qwen2-7B", 28, 3584, 28, 4, 128, 18944, 32768, True, 0),
    "pixtral-12b": ("Mistral-NeMo-12B", 40, 5120, 32, 8, 128, 14336, 131072, True, 0),
    # The old table counted 40 layers (32 + 8 cross-attention); the dense cost never used it.
    "llama-3.2-vision-11b": ("Llama-3.1-8B + 8 cross-attention layers", 32, 4096, 32, 8, 128, 14336, 131072, True, 8),
    "idefics3-8b": ("Llama-3.1-8B", 32, 4096, 32, 8, 128, 14336, 131072, True, 0),
    "smolvlm": ("SmolLM2-1.7B", 24, 2048, 32, 32, 64, 8192, 16384, True, 0),
    "smolvlm-256m": ("SmolLM2-135M", 30, 576, 9, 3, 64, 1536, 8192, True, 0),
    "anyres-seed": ("Vicuna-7B (Llama-2-7B)", 32, 4096, 32, 32, 128, 11008, 4096, True, 0),
    "anyres-seed-shuffle": ("Vicuna-7B (Llama-2-7B)", 32, 4096, 32, 32, 128, 11008, 4096, True, 0),
}


@pytest.mark.parametrize("name", sorted(FORMER_TABLE))
def test_llm_shape_is_read_off_the_real_shape_llm(name):
    s = get_preset(name).llm
    got = (s.name, s.layers, s.d_model, s.heads, s.kv_heads, s.head_dim, s.ffn, s.context, s.gated_mlp, s.cross_attention_layers)
    assert got == FORMER_TABLE[name]


def test_llm_shape_follows_the_preset_data():
    # Change the catalog's LLM dict and the budget follows: there is no second copy of the shape.
    from vlmkit import presets
    from vlmkit.presets.budget import llm_shape

    data = copy.deepcopy(presets.get_preset("llava-1.5-7b").data)
    data["llm"]["config"].update(num_hidden_layers=16, num_key_value_heads=8, intermediate_size=8192)
    s = llm_shape(presets.build_meta(presets.Preset("llava-1.5-7b", data)))
    assert (s.layers, s.kv_heads, s.ffn, s.gated_mlp) == (16, 8, 8192, True)


def test_fixed_resolution_counts_are_the_connectors():
    # BLIP-2's 32 is the Q-Former's num_queries, LLaVA-1.5's 576 the MLP over a 24x24 grid;
    # change the connector and `vlmkit tokens` changes with it.
    from vlmkit import presets

    for name, options, expected in [("blip2", {"num_queries": 16}, 16), ("openflamingo", {"latents": 48}, 48)]:
        data = copy.deepcopy(presets.get_preset(name).data)
        data["connector"]["options"].update(options)
        meta = presets.build_meta(presets.Preset(name, data))
        assert presets.image_processor(meta).layout(640, 480).visual_tokens == expected
    data = copy.deepcopy(presets.get_preset("llava-1.5-7b").data)
    data["connector"] = {"name": "pooling", "options": {"kernel": 2}}
    assert presets.image_processor(presets.build_meta(presets.Preset("llava-1.5-7b", data))).layout(640, 480).visual_tokens == 144


def test_aliases_give_the_same_budget():
    from vlmkit.presets import aliases

    for alias, name in aliases().items():
        assert image_budget(alias, 1024, 768) == image_budget(name, 1024, 768)
    res = runner.invoke(app, ["tokens", "-p", "llava-v1.6-vicuna-7b", "-s", "1024x768", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["preset"] == "llava-next-7b"


def test_notes_do_not_contradict_the_counts():
    # The notes are prose kept word for word from the old table; where one names a count, it must
    # be the count the processor and connector give.
    import re

    from vlmkit import presets

    checked = 0
    for name in preset_names():
        p, meta = get_preset(name), presets.build_meta(name)
        size = meta.preset.data["image"]["size"]
        layout = p.processor.layout(size, size)
        per_view = layout.parts.get("tokens_per_crop", layout.visual_tokens)
        for pattern, expected in [(r"(\d+) tokens each", per_view),
                                  (r"(\d+) learned queries", meta.parts["connector"].num_tokens(meta.preset.feature_grid)),
                                  (r"(\d+) Perceiver latents", meta.parts["connector"].num_tokens(meta.preset.feature_grid))]:
            for found in re.findall(pattern, p.note):
                assert int(found) == expected, (name, p.note)
                checked += 1
    assert checked >= 6
