"""The quickstart's held-out split is never trained on, the `synth-qa` benchmark scores
each question kind by its task's official rule, held-out evaluation while training logs per-kind
accuracy without changing the training run, and the connector's text-scale output norm."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from vlmkit.config import load_config
from vlmkit.data.synthetic.tasks import KINDS, generate, image_digest, question_kind
from vlmkit.eval.benchmarks import get_benchmark
from vlmkit.train.loop import run_training
from vlmkit.utils import read_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import TINY_SECTIONS as TINY  # noqa: E402



@pytest.fixture(scope="module")
def quickstart_data(tmp_path_factory) -> Path:
    """The data `vlmkit quickstart` trains and evaluates on, at its own default sizes and seed."""
    from vlmkit.quickstart import run_quickstart

    defaults = {k: p.default for k, p in inspect.signature(run_quickstart).parameters.items()}
    out = tmp_path_factory.mktemp("qs")
    generate(out, n_caption=defaults["n_caption"], n_instruct=defaults["n_instruct"], n_test=defaults["n_test"], seed=defaults["seed"],
             n_instruct_more=defaults["n_instruct_more"])
    return out


def _digests(root: Path, split: str) -> dict[str, str]:
    return {r["id"]: image_digest(Image.open(root / r["image"]).convert("RGB"))
            for r in json.loads((root / f"{split}.json").read_text())}


def test_held_out_images_and_questions_are_never_trained_on(quickstart_data):
    # Pixels, not file names: a bar chart is fully set by three values and a shade, so a random
    # draw can repeat a training chart exactly (three did before the generator checked).
    trained = {d: rid for split in ("stage1", "stage2") for rid, d in _digests(quickstart_data, split).items()}
    test = _digests(quickstart_data, "test")
    overlap = {rid: trained[d] for rid, d in test.items() if d in trained}
    assert not overlap, f"held-out images also in training: {overlap}"
    assert len(set(test.values())) == len(test), "a held-out image appears twice"
    # Nor are the README's chat examples (docs/examples, drawn by their own script).
    examples = Path(__file__).resolve().parents[2] / "docs" / "examples"
    shown = {p.name: image_digest(Image.open(p).convert("RGB")) for p in sorted(examples.glob("*.png"))}
    assert len(shown) == 3 and not {n for n, d in shown.items() if d in trained or d in set(test.values())}
    # Every kind is asked in the held-out split.
    records = json.loads((quickstart_data / "test.json").read_text())
    assert {question_kind(r) for r in records} == set(KINDS)


def test_generator_is_a_pure_function_of_its_seed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate(a, n_caption=6, n_instruct=6, n_test=9, seed=1)
    generate(b, n_caption=6, n_instruct=6, n_test=9, seed=1)
    assert (a / "test.json").read_text() == (b / "test.json").read_text()


def test_extra_images_follow_their_kind_cycle_and_leave_the_held_out_split_alone(tmp_path):
    plain, more = tmp_path / "plain", tmp_path / "more"
    generate(plain, n_caption=3, n_instruct=3, n_test=6, seed=2)
    generate(more, n_caption=3, n_instruct=3, n_test=6, seed=2, n_instruct_more=6, n_caption_more=2, more_kinds=("chart", "chart", "text"))
    assert (plain / "test.json").read_text() == (more / "test.json").read_text()
    extra = [r for r in json.loads((more / "stage2.json").read_text()) if r["id"].startswith("stage2more")]
    assert [r["task"] for r in extra] == ["chart", "chart", "text"] * 2
    captions = [r for r in json.loads((more / "stage1.json").read_text()) if r["id"].startswith("stage1more")]
    assert len(captions) == 2 and all(r["conversations"][1]["value"] for r in captions)
    with pytest.raises(ValueError, match=r"more_kinds names \['table'\]"):
        generate(tmp_path / "bad", n_caption=0, n_instruct=0, n_test=0, n_instruct_more=1, more_kinds=("table",))
    assert not (tmp_path / "bad").exists()  # refused before anything is drawn or written


def test_synth_qa_scores_each_kind_by_its_rule(quickstart_data):
    bench = get_benchmark("synth-qa")
    items = bench.load(quickstart_data)
    gold = {it.id: it.answers[0] for it in items}
    result = bench.score(items, gold)
    assert result.overall == 1.0 and set(KINDS) <= set(result.breakdown)
    # ChartQA's relaxed accuracy takes 5% off a number; OCRBench's rule finds the word in a sentence;
    # VQA normalisation maps "Three." to "3".
    wrong = {it.id: "nonsense" for it in items}
    assert bench.score(items, wrong).overall == 0.0
    by_kind = {it.metadata["kind"]: it for it in items}
    bar, word, count = by_kind["bar"], by_kind["word"], by_kind["count"]
    preds = {bar.id: f"{float(bar.answers[0]) * 1.04:.2f}", word.id: f"The word is {word.answers[0].upper()}.",
             count.id: {"1": "One.", "2": "Two.", "3": "Three.", "4": "four"}[count.answers[0]]}
    subset = [bar, word, count]
    assert bench.score(subset, preds).per_item == {bar.id: 1.0, word.id: 1.0, count.id: 1.0}


def _recipe(tmp_path: Path, data: Path, eval_every: int | None) -> object:
    train = {"output_dir": str(tmp_path / f"run-{eval_every}"), "max_length": 256, "seed": 0,
             "stages": {"sft": {"data": str(data / "stage2.json"), "trainable": ["connector"], "lr": 1e-3,
                                "batch_size": 4, "max_steps": 4}}}
    if eval_every:
        train["eval"] = {"benchmark": "synth-qa", "data": str(data), "every": eval_every, "limit": 6, "max_new_tokens": 3}
    return load_config({"model": {**TINY, "connector": {"name": "mlp", "output_norm": "text"}}, "train": train})


def test_held_out_eval_while_training_logs_kinds_and_leaves_training_alone(tmp_path):
    torch.set_num_threads(1)
    data = tmp_path / "data"
    generate(data, n_caption=2, n_instruct=12, n_test=6, seed=0)
    _, with_eval = run_training(_recipe(tmp_path, data, 2), progress=False)
    _, without = run_training(_recipe(tmp_path, data, None), progress=False)
    assert with_eval[0].losses == without[0].losses  # evaluating (greedy, no grad) changes nothing
    evals = [r for r in read_jsonl(tmp_path / "run-2" / "metrics.jsonl") if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["benchmark"] == "synth-qa" and r["items"] == 6 and 0.0 <= r["overall"] <= 1.0
        assert set(r["breakdown"]) >= {"word", "bar"} and r["eval_s"] > 0
    assert with_eval[0].eval_seconds > 0 and without[0].eval_seconds == 0


def test_eval_data_path_resolves_like_stage_data(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  stages:\n    s: {data: d/train.json, trainable: [connector], lr: 1.0e-3}\n"
                      "  eval: {benchmark: synth-qa, data: d/test.json}\n")
    cfg = load_config(recipe)
    assert cfg.train.eval.data == str(tmp_path / "d" / "test.json")
    cfg = load_config(recipe, ["train.data_dir=elsewhere"])
    assert cfg.train.eval.data == str(Path.cwd() / "elsewhere" / "d" / "test.json")


def test_text_output_norm_starts_at_the_text_embedding_scale():
    from vlmkit.model.vlm import VisionLanguageModel

    torch.manual_seed(0)
    cfg = load_config({"model": {**TINY, "connector": {"name": "mlp", "output_norm": "text"}}}).model
    model = VisionLanguageModel.build(cfg, pretrained=False)
    table = model.llm.get_input_embeddings().weight
    text_rms = table.pow(2).mean(-1).sqrt().mean()
    features = 100 * torch.randn(3, 16, model.vision.hidden_size)  # unnormalised, far off scale
    tokens = model.connector.tokens(features, (4, 4))
    assert torch.allclose(tokens.pow(2).mean(-1).sqrt(), text_rms.expand(3, 16), rtol=1e-3)
    # The gain trains with the connector and is saved with it.
    assert "output_norm.gain" in dict(model.connector.named_parameters())
    tokens.sum().backward()
    assert model.connector.output_norm.gain.grad is not None
    # Without the option, the connector's raw output goes in.
    plain = VisionLanguageModel.build(load_config({"model": {**TINY, "connector": {"name": "mlp"}}}).model, pretrained=False)
    assert getattr(plain.connector, "output_norm", None) is None



def test_efficientnet_feature_layer_picks_the_block_before_the_head():
    from vlmkit.model.vision import EfficientNetLiteTower

    torch.set_num_threads(1)
    head = EfficientNetLiteTower("efficientnet-lite0").eval()
    block = EfficientNetLiteTower("efficientnet-lite0", feature_layer=-2).eval()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        h, b = head(pixels), block(pixels)
    assert h.shape == (1, 4, 1280) and b.shape == (1, 4, 320) and block.hidden_size == 320
    # The same network up to the head: the head applied to the block output gives the head features.
    with torch.no_grad():
        net = head.net
        x = b.transpose(1, 2).reshape(1, 320, 2, 2)
        again = net._swish(net._bn1(net._conv_head(x))).flatten(2).transpose(1, 2)
    torch.testing.assert_close(again, h)
    assert not hasattr(block.net, "_conv_head")  # unused weights are not kept
    with pytest.raises(ValueError, match="feature_layer"):
        EfficientNetLiteTower("efficientnet-lite0", feature_layer=-3)


def test_vlmkit_train_command_runs_held_out_checks_and_eval_scores_by_kind(tmp_path):
    # As a user drives it: data on disk, a recipe file with `train.eval`, `vlmkit train`, then
    # `vlmkit eval run -b synth-qa` on the checkpoint; the held-out lines and the per-kind scores
    # come out of the commands, not the Python API.
    generate(tmp_path / "data", n_caption=2, n_instruct=12, n_test=6, seed=0)
    recipe = {"model": {**TINY, "connector": {"name": "mlp", "output_norm": "text"}, "system_prompt": ""},
              "train": {"output_dir": "run", "max_length": 256, "precision": "bf16",
                        "eval": {"benchmark": "synth-qa", "data": "data/test.json", "every": 2, "limit": 4, "max_new_tokens": 3},
                        "stages": {"sft": {"data": "data/stage2.json", "trainable": ["connector"], "lr": 1e-3,
                                           "batch_size": 4, "max_steps": 2}}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def vlmkit(*args):
        out = subprocess.run([sys.executable, "-m", "vlmkit.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    vlmkit("train", "recipe.yaml")
    evals = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2] and evals[0]["items"] == 4
    vlmkit("eval", "run", "-b", "synth-qa", "-d", "data", "-m", "vlmkit:run/checkpoints/sft", "-o", "scores")
    results = json.loads(next((tmp_path / "scores").rglob("results.json")).read_text())
    text = json.dumps(results)
    assert "synth-qa" in text and "word" in text and "bar" in text
    # `vlmkit eval run` answers in the precision the checkpoint trained in, as the quickstart does.
    from vlmkit.eval.backends import VlmkitBackend

    assert VlmkitBackend.from_checkpoint(str(tmp_path / "run" / "checkpoints" / "sft"), device="cpu").bf16
