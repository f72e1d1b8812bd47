"""Presets: real shapes on the meta device match the released totals; tiny variants train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlmkit.data.collate import collate
from vlmkit.data.formats import Message, Sample
from vlmkit.processing import build_chat_processor
from vlmkit.train.losses import decoder_hidden, next_token_loss
from PIL import Image
from typer.testing import CliRunner

from vlmkit import presets
from vlmkit.cli import app
from vlmkit.config import ModelConfig
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.presets import aliases
from vlmkit.processing import build_image_processor

ALL = presets.names()
INSPECT_REFERENCE = json.loads((Path(__file__).parents[1] / "data" / "inspect_reference.json").read_text())["reports"]


def test_every_seed_model_has_a_preset():
    wanted = {"llava-1.5-7b", "llava-1.5-13b", "llava-next", "blip2", "instructblip", "openflamingo", "idefics2", "internvl2-76b",
              "qwen2-vl-2b", "qwen2-vl-7b", "qwen2-vl-72b", "pixtral-12b", "llama-3.2-vision-11b", "llama-3.2-vision-90b",
              "paligemma", "fuyu-8b", "idefics3-8b", "smolvlm"}
    assert wanted <= set(ALL)


@pytest.fixture(scope="module")
def reports():
    return {name: presets.inspect_preset(name) for name in ALL}


@pytest.mark.parametrize("name", ALL)
def test_real_shape_matches_published_total_within_2_percent(name, reports):
    r = reports[name]
    if r["published"]["total"] is None:
        pytest.skip("no published total")
    assert abs(r["published"]["difference"]) < 0.02, r["params"]


def test_real_shape_is_never_allocated():
    meta = presets.build_meta("qwen2-vl-72b")
    for module in meta.parts.values():
        assert all(p.device.type == "meta" for p in module.parameters())


def test_headline_figures(reports):
    # The examples, to 3 significant figures.
    assert round(reports["llava-1.5-7b"]["params"]["total"] / 1e9, 2) == 7.06
    assert round(reports["qwen2-vl-7b"]["params"]["total"] / 1e9, 2) == 8.29
    assert abs(reports["llama-3.2-vision-11b"]["params"]["total"] / 10.67e9 - 1) < 0.005
    # Qwen2-VL's "675M ViT" includes its 2x2 merger, which we count as the connector.
    q = reports["qwen2-vl-7b"]["params"]
    assert abs((q["vision"] + q["connector"]) / 675e6 - 1) < 0.01
    # Pixtral-ViT ~400M; Llama 3.2's ViT-H (630M) + 8 global layers + tile embeddings.
    assert abs(reports["pixtral-12b"]["params"]["vision"] / 400e6 - 1) < 0.02
    assert reports["llama-3.2-vision-11b"]["params"]["vision"] > 630e6


def test_token_counts(reports):
    tokens = {n: reports[n]["image"]["visual_tokens"] for n in ALL}
    assert tokens["llava-1.5-7b"] == 576
    assert tokens["blip2"] == 32
    assert tokens["internvl2-76b"] == 256  # 1024 patches per 448 px tile, pixel shuffle 0.5
    assert tokens["idefics3-8b"] == 169 and tokens["smolvlm"] == 81
    assert tokens["llama-3.2-vision-11b"] == 1  # cross-attention: one marker slot
    assert reports["llama-3.2-vision-11b"]["image"]["memory_tokens"] == 4 * 1601


def test_fused_parts_have_their_own_counts(reports):
    assert reports["llava-1.5-7b"]["params"]["cross_attention"] == 0
    assert reports["llama-3.2-vision-11b"]["params"]["cross_attention"] > 1.5e9
    assert reports["openflamingo"]["params"]["cross_attention"] > 1e9


def test_every_tokens_preset_is_a_preset():
    # The names `vlmkit tokens` had before the two preset tables became one.
    wanted = {"blip2", "llava-1.5-7b", "llava-1.5-13b", "llava-next-7b", "internvl2-76b", "internvl2-76b-40tiles", "qwen2-vl-7b",
              "pixtral-12b", "llama-3.2-vision-11b", "idefics3-8b", "smolvlm", "smolvlm-256m", "anyres-seed", "anyres-seed-shuffle"}
    assert wanted <= set(ALL)


def test_inspect_and_tokens_take_the_same_names():
    runner = CliRunner()
    inspect_names = runner.invoke(app, ["inspect", "list"]).output.split()
    tokens_names = [line.split()[0] for line in runner.invoke(app, ["tokens", "--list"]).output.splitlines()]
    assert inspect_names == tokens_names == ALL
    assert len(set(ALL)) == len(ALL)


def test_aliases_resolve_in_both_commands():
    runner = CliRunner()
    assert not set(aliases()) & set(ALL)
    for alias, name in aliases().items():
        assert presets.resolve(alias) == name and presets.get_preset(alias).name == name
    res = runner.invoke(app, ["inspect", "llava-v1.6-mistral-7b", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["preset"] == "llava-next"
    res = runner.invoke(app, ["tokens", "-p", "llava-v1.6-mistral-7b", "-s", "640x480", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["preset"] == "llava-next"
    with pytest.raises(KeyError, match="llava-1.5-7b"):
        presets.resolve("llava-9")


@pytest.mark.parametrize("name", sorted(INSPECT_REFERENCE))
def test_inspect_report_unchanged(name, reports):
    # Recorded before the preset tables were merged: parameter counts, FLOPs, stages, tokens.
    assert json.loads(json.dumps(reports[name])) == INSPECT_REFERENCE[name]


# The count one view costs, as each family's layout reports it for an image at the preset's base
# size, and as the connector makes it from that view's feature grid: they must agree, so a
# processor option that restates a connector setting (a pixel-shuffle factor, a merge size) cannot
# silently disagree with it.
def _per_view(family: str, layout, preset) -> tuple[int, tuple[int, int]]:
    grid = preset.feature_grid
    if family in ("anyres", "anyres-video"):  # anyres-video: LLaVA-NeXT-Video, AnyRes for images
        # The base (global) view; the seed example shrinks it to 224 px.
        side = layout.parts["base_image"][0] * grid[0] // preset.data["image"]["size"]
        return layout.parts["base_tokens"], (side, side)
    if family == "dynamic":
        return layout.parts["tokens_per_tile"], grid
    if family == "idefics3":
        return layout.parts["tokens_per_crop"], grid
    if family == "mllama":
        return layout.parts["states_per_tile"] - 1, grid  # + each tile's CLS state, not a grid token
    return layout.visual_tokens, grid


@pytest.mark.parametrize("name", ALL)
def test_processor_and_connector_agree_on_one_view(name):
    meta = presets.build_meta(name)
    family = meta.preset.processor_config().name
    size = meta.preset.data["image"]["size"]
    tokens, grid = _per_view(family, presets.image_processor(meta).layout(size, size), meta.preset)
    assert tokens == meta.parts["connector"].num_tokens(grid)


@pytest.mark.parametrize("name", ALL)
def test_tiny_variant_is_the_same_family_at_toy_size(name):
    from vlmkit.registry import IMAGE_PROCESSORS

    preset = presets.get_preset(name)
    tiny, real = preset.tiny_config(), preset.processor_config()
    assert isinstance(tiny, ModelConfig)
    assert tiny.processor.name == real.name and tiny.fusion == preset.fusion
    assert tiny.connector.name == preset.data["connector"]["name"]
    assert tiny.processor.image_size < real.image_size
    proc = IMAGE_PROCESSORS.build(tiny.processor.name, tiny.processor, tokens_per_image=4)
    assert proc.layout(64, 48).visual_tokens > 0


@pytest.mark.parametrize("name", ALL)
def test_tiny_variant_trains_on_cpu(name):
    preset = presets.get_preset(name)
    torch.manual_seed(0)
    model = VisionLanguageModel.build(preset.tiny_config(), pretrained=False)
    assert model.config.fusion == preset.fusion
    # Same processor family as the real shape, at toy size, and it preprocesses.
    assert model.config.processor.name == preset.processor_config().name
    proc = build_image_processor(model.config, tokens_per_image=model.tokens_per_image)
    out = proc.preprocess(Image.new("RGB", (45, 30), (90, 120, 200)))
    assert out.layout == proc.layout(45, 30) and out.layout.visual_tokens > 0
    model.set_trainable(sorted(set(sum(preset.stages.values(), []))))
    model.train()
    # Through the processor and collator, two images of different sizes in one batch.
    chat = build_chat_processor(model, 4096)
    samples = [Sample(id=str(i), messages=[Message("user", "<image>\nWhat is it?"), Message("assistant", "ok")],
                      images=[Image.new("RGB", size, (90, 120, 200))]) for i, size in enumerate([(45, 30), (30, 60)])]
    batch = collate([chat.encode(s) for s in samples], pad_id=0)
    head = model.llm.get_output_embeddings()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss, _ = next_token_loss(decoder_hidden(model, batch), batch.labels, head)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]


def test_inspect_json(capsys):
    from typer.testing import CliRunner

    from vlmkit.cli import app

    result = CliRunner().invoke(app, ["inspect", "llava-1.5-7b", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["params"]["total"] == sum(data["params"][p] for p in ("vision", "connector", "cross_attention", "llm"))
    assert data["stages"]["stage1-align"]["trainable"] == data["params"]["connector"]
    assert data["image"]["visual_tokens"] == 576 and data["image"]["flops"]["total"] > 7e12


def test_inspect_unknown_preset_lists_known_ones():
    from typer.testing import CliRunner

    from vlmkit.cli import app

    result = CliRunner().invoke(app, ["inspect", "llava-9"])
    assert result.exit_code != 0
    assert "llava-1.5-7b" in result.output
