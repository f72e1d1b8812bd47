"""Issue 2 core: config, chat processor and label masks, prefix fusion, generation, trainer,
checkpoints, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests._tiny import tiny_config
from vlmkit.config import ConfigError, load_config
from vlmkit.data.collate import collate
from vlmkit.data.formats import BadRecordError, Message, Sample, read_llava_json
from vlmkit.generate import GenerationConfig, generate
from vlmkit.model.vlm import IGNORE_INDEX, VisionLanguageModel
from vlmkit.processing import build_chat_processor
from vlmkit import checkpoint as ckpt
from vlmkit.train.loop import run_training
from vlmkit.train.preflight import DataError
from vlmkit.processing.base import VisualBatch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from vlmkit.data.synthetic.tasks import generate as generate_data

    out = tmp_path_factory.mktemp("synth")
    generate_data(out, n_caption=12, n_instruct=24, n_test=6, seed=1)
    return out


def tiny_model(seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    return VisionLanguageModel.build(tiny_config("mlp"), pretrained=False)


def tiny_recipe(data_dir: Path, out: Path, **stage_overrides) -> dict:
    model = tiny_config("mlp").model_dump(mode="json")
    stage2 = {"data": str(data_dir / "stage2.json"), "trainable": ["connector", "llm"], "lr": 3e-3, "batch_size": 4, "max_steps": 6}
    stage2.update(stage_overrides)
    return {
        "model": model,
        "train": {
            "output_dir": str(out),
            "stages": {
                "align": {"data": str(data_dir / "stage1.json"), "trainable": ["connector"], "lr": 3e-3, "batch_size": 4, "max_steps": 3},
                "instruct": stage2,
            },
        },
    }


# ---- config ---------------------------------------------------------------------------------

def test_config_overrides_and_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  stages:\n    a: {data: x.json, trainable: [connector], lr: 0.001}\n")
    cfg = load_config(recipe, ["train.stages.a.lr=0.01", "model.connector.name=linear", "train.precision=bf16"])
    assert cfg.train.stages["a"].lr == 0.01 and cfg.model.connector.name == "linear" and cfg.train.precision == "bf16"
    with pytest.raises(ConfigError, match=r"model\.visoin"):
        load_config(recipe, ["model.visoin.name=x"])
    with pytest.raises(ConfigError, match=r"train\.stages\.a\.trainable"):
        load_config(recipe, ["train.stages.a.trainable=[conector]"])
    with pytest.raises(ConfigError, match=r"train\.stages\.a\.lr"):
        load_config(recipe, ["train.stages.a.lr=-1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_packaged_quickstart_recipe_validates():
    from vlmkit.quickstart import default_recipe

    cfg = load_config(default_recipe())
    assert list(cfg.train.stages) == ["embed", "instruct"]
    assert cfg.train.stages["embed"].loss == "embed-align" and cfg.train.stages["embed"].trainable == ["connector"]
    assert cfg.train.eval.stages == ["instruct"]
    assert cfg.model.llm.name == "smollm2-135m-instruct" and cfg.model.connector.name == "pixel-shuffle"
    assert cfg.train.eval is not None and cfg.train.eval.benchmark == "synth-qa"


# ---- processor ------------------------------------------------------------------------------

def test_labels_cover_exactly_the_assistant_turns(data_dir):
    model = tiny_model()
    proc = build_chat_processor(model, 512)
    img = data_dir / "images" / "stage2_00000_scene.png"
    sample = Sample("multi", [
        Message("user", "<image>\nHow many?"), Message("assistant", "three"),
        Message("user", "And the colour?"), Message("assistant", "red"),
    ], [img])
    enc = proc.encode(sample)
    tok = model.tokenizer
    supervised = enc.input_ids[enc.labels != IGNORE_INDEX]
    # Both answers, each with the template's end-of-turn, and nothing from the user turns.
    assert tok.decode(supervised) == "three<|im_end|>\nred<|im_end|>\n"
    assert int((enc.input_ids == model.image_token_id).sum()) == model.tokens_per_image
    assert (enc.labels[enc.input_ids == model.image_token_id] == IGNORE_INDEX).all()
    # Labels equal input ids wherever they are set (next-token shift happens in the loss).
    keep = enc.labels != IGNORE_INDEX
    assert torch.equal(enc.labels[keep], enc.input_ids[keep])


def test_bad_records_name_the_record(data_dir, tmp_path):
    model = tiny_model()
    proc = build_chat_processor(model, 512)
    img = data_dir / "images" / "stage2_00000_scene.png"
    with pytest.raises(BadRecordError, match="no-placeholder.*placeholder"):
        proc.encode(Sample("no-placeholder", [Message("user", "What?"), Message("assistant", "x")], [img]))
    with pytest.raises(BadRecordError, match="missing-image.*not found"):
        proc.encode(Sample("missing-image", [Message("user", "<image> What?"), Message("assistant", "x")], [tmp_path / "nope.png"]))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(Image.open(img).tobytes()[:100])
    with pytest.raises(BadRecordError, match="corrupt-image.*cannot decode"):
        proc.encode(Sample("corrupt-image", [Message("user", "<image> What?"), Message("assistant", "x")], [corrupt]))
    short = build_chat_processor(model, 40)
    with pytest.raises(BadRecordError, match="too-long.*longer than the context.*never truncated"):
        short.encode(Sample("too-long", [Message("user", "<image> What?"), Message("assistant", "x")], [img]))


def test_bad_records_skipped_and_counted_when_asked(data_dir, tmp_path):
    records = json.loads((data_dir / "stage2.json").read_text())[:8]
    records[2]["image"] = "images/does-not-exist.png"
    records[5]["conversations"][0]["value"] = "no placeholder here"
    bad = data_dir / "bad.json"  # images resolve against the file's folder
    bad.write_text(json.dumps(records))
    recipe = tiny_recipe(data_dir, tmp_path / "run", data=str(bad), max_steps=2)
    del recipe["train"]["stages"]["align"]
    # The missing image is found by the data check before the model is touched.
    with pytest.raises(DataError, match=records[2]["id"] + ".*does-not-exist.png"):
        run_training(load_config(recipe), model=tiny_model(), progress=False)
    recipe["train"]["on_bad_record"] = "skip"
    recipe["train"]["max_skip_fraction"] = 0.25  # 2 of 8 (the default, 0.1, refuses the stage)
    _, results = run_training(load_config(recipe), model=tiny_model(), progress=False)
    assert [rid for rid, _ in results[0].skipped] == [records[2]["id"], records[5]["id"]]


# ---- model ----------------------------------------------------------------------------------

def test_prefix_fusion_fills_image_slots_in_order():
    model = tiny_model().eval()
    n = model.tokens_per_image
    ids = torch.tensor([[5, *[model.image_token_id] * n, 6, *[model.image_token_id] * n, 7]])
    pixels = torch.randn(2, 3, model.config.processor.image_size, model.config.processor.image_size)
    with torch.no_grad():
        embeds = model.inputs_embeds(ids, VisualBatch.of_pixels(pixels))
        projected = model.connector.tokens(model.vision_features(pixels), model.image_grid)
    slots = (ids[0] == model.image_token_id).nonzero().flatten()
    assert torch.equal(embeds[0, slots[:n]], projected[0]) and torch.equal(embeds[0, slots[n:]], projected[1])
    assert torch.equal(embeds[0, 0], model.llm.get_input_embeddings().weight[5])
    with pytest.raises(ValueError, match="image-token slots"):
        model.inputs_embeds(ids, VisualBatch.of_pixels(pixels[:1]))


# ---- generation -----------------------------------------------------------------------------

def _prompts(model, data_dir):
    proc = build_chat_processor(model, 512)
    images = sorted((data_dir / "images").glob("test_*.png"))
    questions = ["<image>\nWhat is it?", "<image>\nDescribe this picture in many more words, please.", "Just text, no image at all?"]
    return [proc.encode_prompt([Message("user", q)], [images[i]] if "<image>" in q else []) for i, q in enumerate(questions)]


def test_batched_greedy_equals_one_by_one(data_dir):
    model = tiny_model(seed=3).eval()
    prompts = _prompts(model, data_dir)
    cfg = GenerationConfig(max_new_tokens=12)
    batched = generate(model, prompts, cfg)
    alone = [generate(model, [p], cfg)[0] for p in prompts]
    assert batched == alone
    assert all(len(t) > 0 for t in batched)


def test_kv_cache_decoding_matches_full_recompute(data_dir):
    model = tiny_model(seed=4).eval()
    prompt = _prompts(model, data_dir)[0]
    produced = generate(model, [prompt], GenerationConfig(max_new_tokens=6))[0]
    ids = prompt.input_ids.clone()
    with torch.no_grad():
        for expected in produced:
            logits = model(ids[None], visuals=VisualBatch(prompt.images)).logits[0, -1]
            assert int(logits.argmax()) == expected
            ids = torch.cat([ids, torch.tensor([expected])])


def test_sampling_is_seeded(data_dir):
    model = tiny_model(seed=5).eval()
    prompts = _prompts(model, data_dir)[:2]
    cfg = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, seed=11)
    first, again = generate(model, prompts, cfg), generate(model, prompts, cfg)
    other = generate(model, prompts, GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, seed=12))
    assert first == again and first != other


# ---- training -------------------------------------------------------------------------------

def test_stage_freeze_spec_decides_which_parts_get_gradients(data_dir):
    model = tiny_model()
    model.set_trainable(["connector"])
    proc = build_chat_processor(model, 512)
    batch = collate([proc.encode(s) for s in read_llava_json(data_dir / "stage2.json")[:3]], model.tokenizer.pad_token_id)
    model.train()
    out = model(batch.input_ids, batch.visuals, attention_mask=batch.attention_mask, labels=batch.labels, position_ids=batch.position_ids)
    out.loss.backward()
    for name, module in model.parts().items():
        grads = [p.grad for p in module.parameters()]
        if name == "connector":
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None for g in grads), name
    assert not model.vision.training  # a frozen tower stays in eval mode (dropout, BatchNorm)


def test_two_stage_training_learns_and_checkpoints_round_trip(data_dir, tmp_path):
    cfg = load_config(tiny_recipe(data_dir, tmp_path / "run", max_steps=30, lr=1e-2))
    model, results = run_training(cfg, model=tiny_model(), progress=False)
    align, instruct = results
    assert align.trainable_parameters["llm"] == 0 and align.trainable_parameters["connector"] > 0
    assert instruct.trainable_parameters["llm"] > 0
    assert sum(instruct.losses[-5:]) / 5 < sum(instruct.losses[:5]) / 5 * 0.7
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {m["stage"] for m in metrics} == {"align", "instruct"} and all("loss" in m and "lr" in m for m in metrics)

    loaded, _ = ckpt.load_checkpoint(instruct.checkpoint)
    model.eval()
    prompts = _prompts(model, data_dir)
    cfg_gen = GenerationConfig(max_new_tokens=6)
    assert generate(loaded, prompts, cfg_gen) == generate(model, prompts, cfg_gen)
    with torch.no_grad():
        a = model(prompts[0].input_ids[None], visuals=VisualBatch(prompts[0].images)).logits
        b = loaded(prompts[0].input_ids[None], visuals=VisualBatch(prompts[0].images)).logits
    assert torch.equal(a, b)
    # Checkpoints are safetensors + JSON, nothing pickled but the optional trainer state.
    names = {p.name for p in instruct.checkpoint.iterdir()}
    assert {"model.safetensors", "config.json", "meta.json", "tokenizer"} <= names

    # A finished run is not redone: rerunning loads the final checkpoints instead.
    _, again = run_training(cfg, model=tiny_model(), progress=False)
    assert [r.steps for r in again] == [0, 0]


def test_training_resumes_from_periodic_checkpoint(data_dir, tmp_path):
    recipe = tiny_recipe(data_dir, tmp_path / "full", max_steps=6)
    del recipe["train"]["stages"]["align"]
    recipe["train"]["save_every"] = 3
    _, full = run_training(load_config(recipe), model=tiny_model(), progress=False)

    # Interrupt after step 3 by stopping the run, then resume in a fresh process-like state.
    recipe["train"]["output_dir"] = str(tmp_path / "cut")
    recipe["train"]["stages"]["instruct"]["max_steps"] = 6
    cfg = load_config(recipe)
    from vlmkit.train import loop

    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def failing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = failing_step
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_training(cfg, model=tiny_model(), progress=False)
    finally:
        torch.optim.AdamW.step = real_step
    assert (tmp_path / "cut" / "checkpoints" / "instruct-last").is_dir()
    _, resumed = run_training(cfg, model=tiny_model(), progress=False)
    assert resumed[0].losses == pytest.approx(full[0].losses, rel=1e-5)


# ---- CLI ------------------------------------------------------------------------------------

def test_chat_command_answers_from_a_checkpoint(data_dir, tmp_path):
    from typer.testing import CliRunner

    from vlmkit.cli import app

    model = tiny_model()
    cfg = load_config({"model": tiny_config("mlp").model_dump(mode="json")})
    model.set_trainable(["connector"])
    ckpt.save_checkpoint(tmp_path / "ck", model, cfg)
    image = data_dir / "images" / "test_00000_scene.png"
    result = CliRunner().invoke(app, ["chat", "--checkpoint", str(tmp_path / "ck"), "--image", str(image), "--max-new-tokens", "5", "What is this?"])
    assert result.exit_code == 0, result.output
    proc = build_chat_processor(model, 512)
    expected = generate(model.eval(), [proc.encode_prompt([Message("user", "<image>\nWhat is this?")], [image])], GenerationConfig(max_new_tokens=5))[0]
    assert result.output.strip() == model.tokenizer.decode(expected, skip_special_tokens=True).strip()
