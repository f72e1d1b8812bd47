"""Issue 18: the quickstart recipe, scaled down (its own pretrained parts, stages and settings; fewer
images and steps), learns to read: on held-out images its word and colour answers beat the prior
baseline (the answer most often given to the question in training) by a wide margin. Seeds are
fixed; the assertions are margins, not exact values."""

from __future__ import annotations

import json

import pytest
import torch

from vlmkit.config import load_config
from vlmkit.data.synthetic.tasks import generate
from vlmkit.quickstart import answer_questions, default_recipe, prior_answers, summarise_kinds
from vlmkit.train.loop import run_training

pytestmark = pytest.mark.slow

# The two kinds the issue names; text and scene images only, so every step teaches one of them.
KINDS_UNDER_TEST = {"word": "text", "colour": "scene"}


def test_scaled_down_quickstart_reads_words_and_colours_well_above_the_prior(tmp_path):
    torch.set_num_threads(1)
    data = tmp_path / "data"
    generate(data, n_caption=0, n_instruct=480, n_test=120, seed=0)
    train = [r for r in json.loads((data / "stage2.json").read_text()) if r["task"] in KINDS_UNDER_TEST.values()]
    (data / "stage2.json").write_text(json.dumps(train))
    test = [r for r in json.loads((data / "test.json").read_text()) if r["kind"] in KINDS_UNDER_TEST]
    assert {r["kind"] for r in test} == set(KINDS_UNDER_TEST) and len(test) >= 30

    config = load_config(default_recipe(), [
        f"train.output_dir={tmp_path / 'run'}", f"train.data_dir={data}", "train.seed=0", "train.eval=null",
        "train.stages.embed.max_steps=60", "train.stages.instruct.max_steps=70",
    ])
    torch.manual_seed(0)
    model, stages = run_training(config, progress=False)
    assert [s.name for s in stages] == ["embed", "instruct"]
    model.eval()

    vlmkit = summarise_kinds(answer_questions(model, test, data, with_image=True, bf16=True))
    prior = summarise_kinds(prior_answers(train, test))
    print("vlmkit", vlmkit, "prior", prior)
    for kind in KINDS_UNDER_TEST:
        assert vlmkit[kind] >= prior[kind] + 0.25, (kind, vlmkit, prior)
