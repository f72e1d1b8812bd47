"""Token budget: counts from the family processors, costs from the preset's LLM shape, the CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vlmkit.cli import app
from vlmkit.processing.budget import PRESETS, image_budget, seed_table

runner = CliRunner()


def test_seed_table_rows_reproduced():
    rows = {r["model"]: r for r in seed_table()}
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
    for name in PRESETS:
        for w, h in [(1, 1), (33, 7), (4000, 3000)]:
            b = image_budget(name, w, h)
            assert b.visual_tokens > 0 and b.sequence_tokens > 0
