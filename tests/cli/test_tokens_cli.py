"""`vlmkit tokens` answers "do N of these fit?" `--images N` through the family's own
multi-image processor, labelled FLOPs (vision tower, connector, LLM prefill) checked against a
hand count, `--plot --aspect` with a context line; and the first-day console: `chat` prints no
deprecation warning, `vlmkit --help` cuts no description."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from vlmkit.cli import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()

# A tiny random SigLIP tower (32 px, patch 8: 16 patches, width 32, one layer) and LLM.
TINY = {
    "vision": {"name": "hf-random", "model_type": "siglip_vision_model",
               "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "image_size": 32, "patch_size": 8, "vision_use_head": False}},
    "connector": {"name": "mlp"},
    "llm": {"name": "hf-random", "model_type": "llama",
            "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "num_key_value_heads": 1, "max_position_embeddings": 256}},
    "processor": {"image_size": 32},
}


def tokens(*args: str) -> dict:
    res = runner.invoke(app, ["tokens", *args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def write_recipe(path: Path, **model) -> Path:
    path.write_text(yaml.safe_dump({"model": {**TINY, **model}}))
    return path


def test_four_images_cost_four_times_one_and_the_verdict_follows_the_context():
    one = tokens("-p", "llava-1.5-7b", "-s", "640x480")
    four = tokens("-p", "llava-1.5-7b", "-s", "640x480", "--images", "4")
    assert four["images"] == 4 and four["per_image"]["visual_tokens"] == one["visual_tokens"] == 576
    assert four["visual_tokens"] == 4 * 576 and four["sequence_tokens"] == 4 * one["sequence_tokens"]
    assert four["flops"]["vision"] == 4 * one["flops"]["vision"] and four["flops"]["connector"] == 4 * one["flops"]["connector"]
    # Prefill attention spans all four images: more than four single prefills.
    assert four["flops"]["llm_prefill"] == four["prefill_flops"] > 4 * one["prefill_flops"]
    assert four["kv_cache_bytes"] == 4 * one["kv_cache_bytes"]
    # LLaVA-1.5's 4,096 context holds 4 x 576 = 2,304, not 2,048.
    assert four["context"] == 4096 and four["fits"] is True and four["context_share"] == pytest.approx(2304 / 4096)
    tight = tokens("-p", "llava-1.5-7b", "-s", "640x480", "--images", "4", "--context", "2048")
    assert tight["fits"] is False and tight["context_share"] == pytest.approx(2304 / 2048)
    assert any("exceed the 2,048-token context" in n for n in tight["notes"])
    text = runner.invoke(app, ["tokens", "-p", "llava-1.5-7b", "-s", "640x480", "--images", "4", "--context", "2048"]).output
    assert "does NOT fit, 256 tokens over" in text and "FLOPs, vision tower" in text
    bad = runner.invoke(app, ["tokens", "-p", "llava-1.5-7b", "-s", "640x480", "--images", "0"])
    assert bad.exit_code != 0 and "--images must be positive" in bad.output


def test_onevision_reads_a_multi_image_prompt_at_base_resolution(tmp_path):
    # LLaVA-OneVision: one image is AnyRes (base view + tiles); in a 2-image prompt each image is
    # the base view and one newline, p*p + 1 = 8*8 + 1 tokens, as its processor's for_sample says.
    processor = {"name": "anyres-max", "image_size": 32, "options": {"patch_size": 4, "max_tiles": 4}}
    recipe = str(write_recipe(tmp_path / "onevision.yaml", processor=processor, vision={
        **TINY["vision"], "config": {**TINY["vision"]["config"], "patch_size": 4}}))
    from vlmkit.config import load_config
    from vlmkit.processing import build_image_processor

    own = build_image_processor(load_config(recipe).model)
    one = tokens("-r", recipe, "-s", "96x64")
    two = tokens("-r", recipe, "-s", "96x64", "--images", "2")
    assert one["visual_tokens"] == own.layout(96, 64).visual_tokens > 65
    assert two["per_image"]["visual_tokens"] == own.for_sample(2).layout(96, 64).visual_tokens == 65
    assert two["visual_tokens"] == 130 and two["per_image"]["parts"]["multi_image"] is True
    # One view per image in the prompt, so the tower runs once per image, not once per tile.
    assert two["flops"]["vision"] < 2 * one["flops"]["vision"]


def test_json_labels_the_flops_and_the_tower_count_is_the_hand_count(tmp_path):
    out = tokens("-r", str(write_recipe(tmp_path / "tiny.yaml")), "-s", "64x48")
    assert set(out["flops"]) == {"vision", "connector", "llm_prefill", "total"}
    assert out["flops"]["llm_prefill"] == out["prefill_flops"]
    # 16 patches (32 px, patch 8) through: the patch embedding 3*8*8*32, q/k/v/o 4*32*32, the MLP
    # 2*32*64, 2 FLOPs per weight per patch; attention 4 * 16^2 * 32 (QK^T and AV, one layer).
    n, weights = 16, 3 * 8 * 8 * 32 + 4 * 32 * 32 + 2 * 32 * 64
    assert out["flops"]["vision"] == 2 * n * weights + 4 * n * n * 32
    # The MLP connector: 32 -> 32 -> 32 on each of the 16 tokens.
    assert out["flops"]["connector"] == 2 * n * (32 * 32 + 32 * 32)
    assert out["flops"]["total"] == sum(out["flops"][k] for k in ("vision", "connector", "llm_prefill"))
    # A preset's JSON keeps its recorded keys and adds the labels.
    preset = tokens("-p", "qwen2-vl-7b", "-s", "640x480")
    assert preset["prefill_flops"] == preset["flops"]["llm_prefill"] and preset["flops"]["vision"] > preset["flops"]["connector"] > 0


def test_video_budget_says_whether_it_fits():
    out = tokens("-p", "qwen2-vl-7b", "-s", "640x360", "--video", "16", "--compression", "temporal-patch")
    assert out["visual_tokens"] == 2392 and out["context"] == 32768 and out["fits"] is True
    tight = tokens("-p", "qwen2-vl-7b", "-s", "640x360", "--video", "16", "--compression", "temporal-patch", "--context", "2000")
    assert tight["fits"] is False and tight["context_share"] == pytest.approx(2394 / 2000)


def test_plot_draws_the_asked_aspect_and_the_context_line(tmp_path):
    from vlmkit.commands.tokens import _plot
    from vlmkit.presets.budget import get_preset

    png = tmp_path / "wide.png"
    res = runner.invoke(app, ["tokens", "--plot", str(png), "-p", "llava-next-7b", "--aspect", "16:9", "--context", "4096"])
    assert res.exit_code == 0, res.output
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (960, 600)  # 8 x 5 inches at 120 dpi
    drawn = _plot(str(tmp_path / "again.png"), ["llava-next-7b"], aspect=(16, 9), context=4096)
    proc = get_preset("llava-next-7b").processor
    assert drawn["heights"][0] == 64 * 9 // 16 and drawn["context_lines"] == [4096]
    assert drawn["tokens"]["llava-next-7b"] == [proc.layout(w, h).visual_tokens for w, h in zip(drawn["widths"], drawn["heights"])]
    default = _plot(str(tmp_path / "default.png"), ["llava-next-7b"])
    assert default["heights"][0] == 48 and default["context_lines"] == [4096]  # 4:3; the LLM's own context
    bad = runner.invoke(app, ["tokens", "--plot", str(png), "--aspect", "16x9"])
    assert bad.exit_code != 0 and "aspect must look like 16:9" in bad.output


def test_chat_prints_no_deprecation_warning(tmp_path):
    # transformers 5 logs "`past_key_values`/`cache_params` are deprecated" when a decoder output
    # is read by the old name; a Qwen2-VL checkpoint's chat did, once per run.
    from qwen2_vl_folder import save_qwen2vl

    save_qwen2vl(tmp_path / "hf")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    env.pop("PYTHONWARNINGS", None)  # the console's own warning filters

    def vlmkit(*args):
        out = subprocess.run([sys.executable, "-m", "vlmkit.cli", *args], check=False, cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        return out

    vlmkit("import-hf", "hf", "ck")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    out = vlmkit("chat", "--checkpoint", "ck", "--image", "red.png", "What colour?", "--max-new-tokens", "3")
    console = out.stdout + out.stderr
    for word in ("deprecat", "DeprecationWarning", "FutureWarning", "Failed to load"):
        assert word.lower() not in console.lower(), console


def test_help_lists_every_command_in_full():
    import typer

    from vlmkit.cli import description

    def joined(text: str) -> str:  # help wraps at spaces and after hyphens
        return " ".join(text.split()).replace("- ", "-")

    root = typer.main.get_command(app)
    for group in ([], ["eval"], ["data"]):
        res = runner.invoke(app, [*group, "--help"], terminal_width=80)
        listing = res.output.split("Commands:")[1]  # ("[ARGS]..." in the usage line is click's)
        assert res.exit_code == 0 and "..." not in listing, listing
        listed = joined(listing)
        command = root.get_command(None, group[0]) if group else root
        for name in command.list_commands(None):
            text = description(command.get_command(None, name))
            assert text and joined(f"{name} {text}") in listed, name
    assert "Visual tokens, FLOPs (vision tower, connector, LLM prefill), KV-cache bytes" in joined(runner.invoke(app, ["--help"]).output)
