"""`loss: grpo`: the loss and its gradient against TRL's own GRPO code, group normalisation and
completion masks, a tiny model whose reward rises, resume after SIGKILL, and the refusals."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from vlmkit.config import ConfigError, load_config
from vlmkit.data.collate import collate
from vlmkit.model.vlm import IGNORE_INDEX, VisionLanguageModel, lm_head
from vlmkit.processing import build_chat_processor
from vlmkit.data.formats import read_llava_json
from vlmkit.train.losses import decoder_hidden, group_advantages, grpo_loss_sum, grpo_normaliser, grpo_token_loss, token_logps
from vlmkit.train.loop import run_training
from vlmkit.train.rewards import RewardError, build_reward
from vlmkit.train.rollout import split_record, with_completion
from vlmkit.utils import read_jsonl

from _tiny import TINY_SECTIONS as MODEL  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = Path(__file__).resolve().parents[2]
CHILD = ROOT / "tests" / "_train_child.py"

# A checkable toy task: the answer is a colour word; the reward is the share of the completion's
# characters that are letters of it (dense enough for a random tiny model to find).
TOY_REWARD = ("def letters(completions, references, **kwargs):\n"
              "    return [sum(ch in r for ch in c) / len(c) if c else 0.0 for c, r in zip(completions, references)]\n"
              "def words(completions, **kwargs):\n"
              "    return ['good' for _ in completions]\n")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("grpo")
    records = []
    for i, colour in enumerate(["red", "blue", "green", "red"]):
        Image.new("RGB", (32, 32), colour).save(d / f"{i}.png")
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nName the colour."}, {"from": "gpt", "value": "red"}]})
    (d / "toy.json").write_text(json.dumps(records))
    (d / "toy_reward.py").write_text(TOY_REWARD)
    return d


def recipe(toy: Path, out: Path, train: dict | None = None, grpo: dict | None = None, **stage) -> dict:
    g = {"num_generations": 8, "max_new_tokens": 4, "reward": f"{toy / 'toy_reward.py'}:letters", **(grpo or {})}
    s = {"data": str(toy / "toy.json"), "trainable": ["llm"], "lr": 1e-2, "batch_size": 4, "max_steps": 4,
         "warmup_ratio": 0.0, "loss": "grpo", "grpo": g, **stage}
    return {"model": MODEL, "train": {"output_dir": str(out), "stages": {"grpo": s}, **(train or {})}}


# ---- the loss, against TRL ---------------------------------------------------------------------

def trl_grpo_loss(loss_type: str, logps, inputs: dict, beta: float, eps: float, eps_high: float, max_len: int, accum: int):
    """TRL's `GRPOTrainer._compute_loss` on given log-probs: the trainer is built bare (no model,
    nothing downloaded) with the attributes its loss reads, and its log-prob pass returns `logps`."""
    from trl import GRPOTrainer

    trainer = GRPOTrainer.__new__(GRPOTrainer)
    accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x)
    trainer.__dict__.update(
        accelerator=accelerator, args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=accum),
        beta=beta, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high, importance_sampling_level="token",
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=False,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, max_completion_length=max_len,
        current_gradient_accumulation_steps=accum, model=SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list)})
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    n, t = logps.shape
    batch = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
             "completion_ids": torch.zeros(n, t, dtype=torch.long), **inputs}
    return trainer._compute_loss(None, batch)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,eps_high,fresh", [(0.0, 0.2, True), (0.04, 0.28, False)])
def test_loss_and_gradient_equal_trls(loss_type, beta, eps_high, fresh):
    """Two micro-batches of one step (completions of unequal length, padded): the step's loss and
    the gradient on every log-prob equal TRL's, accumulation included. `fresh`: the first update
    of a generation batch, whose old log-probs are the current ones, detached (as TRL does)."""
    g = torch.Generator().manual_seed(1)
    N, T, max_len, eps = 6, 5, 7, 0.2
    logps = [(-torch.rand(N, T, generator=g) * 3).requires_grad_() for _ in range(2)]
    masks = [(torch.arange(T)[None] < torch.randint(1, T + 1, (N, 1), generator=g)).long() for _ in range(2)]
    olds = [None if fresh else (lp.detach() + 0.3 * torch.randn(N, T, generator=g)) for lp in logps]
    refs = [lp.detach() + 0.5 * torch.randn(N, T, generator=g) for lp in logps]
    advs = [torch.randn(N, generator=g) for _ in range(2)]
    total_tokens = sum(m.sum() for m in masks)

    ours = [lp.clone().detach().requires_grad_() for lp in logps]
    normaliser = sum(grpo_normaliser(m.float(), loss_type, max_len) for m in masks)
    our_loss = 0.0
    for lp, old, ref, adv, m in zip(ours, olds, refs, advs, masks):
        terms = grpo_token_loss(lp, old if old is not None else lp.detach(), adv, eps, eps_high, beta, ref)
        part = grpo_loss_sum(terms.per_token, m.float(), loss_type) / normaliser
        part.backward()
        our_loss += float(part.detach())

    trl_loss = 0.0
    for lp, old, ref, adv, m in zip(logps, olds, refs, advs, masks):
        inputs = {"completion_mask": m, "advantages": adv, "ref_per_token_logps": ref, "num_items_in_batch": total_tokens}
        if old is not None:
            inputs["old_per_token_logps"] = old
        part = trl_grpo_loss(loss_type, lp, inputs, beta, eps, eps_high, max_len, accum=2)
        part.backward()
        trl_loss += float(part.detach())
    assert our_loss == pytest.approx(trl_loss, rel=1e-6, abs=1e-7)
    for a, b in zip(ours, logps):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-8)
        assert a.grad.abs().sum() > 0


def test_clipping_only_where_the_ratio_leaves_the_band_in_the_advantages_direction():
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]]))
    terms = grpo_token_loss(logps, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), 0.2, 0.28)
    assert terms.clipped.tolist() == [[True, False, False], [False, True, False]]
    # A clipped token carries no gradient.
    lp = logps.clone().requires_grad_()
    grpo_token_loss(lp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), 0.2, 0.28).per_token.sum().backward()
    assert lp.grad[0, 0] == 0 and lp.grad[1, 1] == 0 and lp.grad[0, 1] != 0


# ---- group normalisation and masks ---------------------------------------------------------------

def test_group_normalisation_matches_trls_formula_and_flags_groups_without_spread():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.4, 0.9, 0.0])
    G = 4
    mean = rewards.view(-1, G).mean(1).repeat_interleave(G)
    group_std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
    adv, zero = group_advantages(rewards, G, "group")
    torch.testing.assert_close(adv, (rewards - mean) / (group_std + 1e-4))
    assert zero.tolist() == [False] * 4 + [True] * 4 + [False] * 4
    assert adv[4:8].abs().max() == 0  # a group whose rewards are equal teaches nothing
    torch.testing.assert_close(group_advantages(rewards, G, "batch")[0], (rewards - mean) / (nanstd(rewards) + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, G, "none")[0], rewards - mean)
    # Groups are consecutive completions: swapping two groups swaps their advantages.
    swapped = torch.cat([rewards[4:8], rewards[:4], rewards[8:]])
    torch.testing.assert_close(group_advantages(swapped, G)[0][:4], adv[4:8])


@pytest.fixture(scope="module")
def tiny() -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel.build(load_config({"model": MODEL}).model, pretrained=False)


def test_prompt_reference_and_completion_masks(tiny, toy):
    """The prompt is the record up to its last assistant turn, the reference that turn's text; a
    completion's log-probs are read on its own tokens only, whatever the padding."""
    processor = build_chat_processor(tiny, 128)
    sample = processor.encode(read_llava_json(toy / "toy.json")[0])
    prompt, reference, end = split_record(sample, tiny.tokenizer)
    assert reference == "red" and end == tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (prompt.labels == IGNORE_INDEX).all() and prompt.images == sample.images
    asked = processor.encode_prompt(sample_messages(toy), [toy / "0.png"])
    assert prompt.input_ids.tolist() == asked.input_ids.tolist()  # exactly what generation is asked

    completions = [[81, 68, 67, end], [65], [75, 84, 68, 67, 220, 65]]
    batch = collate([with_completion(prompt, c) for c in completions], 0)
    tiny.eval()
    with torch.no_grad():
        hidden = decoder_hidden(tiny, batch)
        got = token_logps(hidden, batch, lm_head(tiny.llm))
        full = torch.log_softmax(lm_head(tiny.llm)(hidden).float(), -1)
    n = len(prompt.input_ids)
    for i, c in enumerate(completions):
        want = full[i, n - 1 : n - 1 + len(c)].gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        torch.testing.assert_close(got[i, : len(c)], want, rtol=1e-5, atol=1e-5)
        assert (got[i, len(c):] == 0).all()
    # Values past a completion's end never reach the loss or its gradient.
    mask = (torch.arange(got.shape[1])[None] < torch.tensor([len(c) for c in completions])[:, None]).float()
    lp = got.clone().requires_grad_()
    noisy = got.clone()
    noisy[mask == 0] = -50.0
    lp2 = noisy.requires_grad_()
    losses = []
    for x in (lp, lp2):
        terms = grpo_token_loss(x, x.detach() - 0.1, torch.tensor([1.0, -0.5, 0.3]), 0.2, 0.2, 0.1, got.detach())
        loss = grpo_loss_sum(terms.per_token, mask, "grpo")
        loss.backward()
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(losses[1])
    assert (lp2.grad[mask == 0] == 0).all()


def sample_messages(toy: Path):
    return read_llava_json(toy / "toy.json")[0].messages[:-1]


# ---- training ----------------------------------------------------------------------------------

def test_tiny_model_reward_rises_on_a_checkable_task(toy, tmp_path):
    cfg = load_config(recipe(toy, tmp_path / "run", max_steps=20))
    torch.manual_seed(0)
    _, (result,) = run_training(cfg, progress=False)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert len(rows) == 20
    first, last = [sum(r["reward"] for r in part) / 5 for part in (rows[:5], rows[-5:])]
    assert last > first + 0.05, (first, last)
    name = f"{toy / 'toy_reward.py'}:letters"
    assert rows[-1][f"rewards/{name}/mean"] == rows[-1]["reward"]
    for key in ("reward_std", "frac_reward_zero_std", "completions/mean_length", "clip_ratio/region_mean"):
        assert key in rows[-1]
    assert 0 < rows[-1]["completions/mean_length"] <= 4
    assert (result.checkpoint / "reward.png").is_file()


def _child(rec: dict, tmp: Path, tag: str, *flags: str) -> subprocess.CompletedProcess:
    rpath = tmp / f"{tag}.recipe.json"
    rpath.write_text(json.dumps(rec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(CHILD), str(rpath), str(tmp / f"{tag}.out.json"), *flags],
                          check=False, capture_output=True, text=True, env=env, timeout=300)


def test_sigkill_and_resume_reproduce_the_uninterrupted_run_bit_for_bit(toy, tmp_path):
    """With LoRA (and its dropout), a KL reference and two updates per generation batch, a run killed after step 5
    resumes from step 4 and ends with the same losses and weights as one never stopped."""
    base = recipe(toy, tmp_path / "full", train={"save_every": 2, "keep_last": 1}, max_steps=6,
                  grpo={"beta": 0.04, "num_iterations": 2, "loss_type": "grpo"}, lora={"r": 4, "targets": ["q_proj", "v_proj"]})
    torch.manual_seed(0)
    full_model, (full,) = run_training(load_config(base), progress=False)
    cut = json.loads(json.dumps(base))
    cut["train"]["output_dir"] = str(tmp_path / "cut")
    r = _child(cut, tmp_path, "cut1", "kill-at-log=5")
    assert r.returncode == -9, r.stderr[-2000:]
    r = _child(cut, tmp_path, "cut2")
    assert r.returncode == 0 and "resuming at step 4/6" in r.stdout, r.stderr[-2000:]
    resumed = json.loads((tmp_path / "cut2.out.json").read_text())
    assert resumed["losses"]["grpo"] == full.losses
    digest = hashlib.sha256()
    for key, value in sorted(full_model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().contiguous().numpy().tobytes())
    assert resumed["weights"] == digest.hexdigest()


# ---- refusals ----------------------------------------------------------------------------------

def test_unknown_reward_is_refused_in_one_line_before_any_work(toy, tmp_path):
    with pytest.raises(ValueError) as e:
        run_training(load_config(recipe(toy, tmp_path / "run", grpo={"reward": {"relaxd": 1.0}})), progress=False)
    assert "unknown reward 'relaxd'" in str(e.value) and "relaxed" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_reward_returning_non_numbers_is_refused_in_one_line(toy, tmp_path):
    rec = recipe(toy, tmp_path / "run", grpo={"reward": {"exact": 1.0, f"{toy / 'toy_reward.py'}:words": 0.5}})
    with pytest.raises(RewardError) as e:
        run_training(load_config(rec), progress=False)
    assert "returned 'good' (str) for completion 0" in str(e.value) and "\n" not in str(e.value)


def test_fewer_than_two_generations_is_refused(toy, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(recipe(toy, tmp_path / "run", grpo={"num_generations": 1}))
    assert "train.stages.grpo.grpo.num_generations: Input should be greater than or equal to 2" in str(e.value).splitlines()[1]


def test_reward_registry_scores_with_the_benchmarks_rules(toy):
    def score(name, completions, references, prompts=None):
        totals, _ = build_reward(name, "^<answer>.*</answer>$")(completions, references, prompts or [""] * len(completions))
        return totals

    assert score("relaxed", ["41", "45", "Yes."], ["42", "42", "yes"]) == [1.0, 0.0, 1.0]  # within 5%, else exact
    assert score("exact", ["The Cat.", "dog"], ["the cat", "cat"]) == [1.0, 0.0]
    assert score("vqa", ["two", "3"], ["2", "2"]) == [1.0, 0.0]
    assert score("anls", ["hello worl"], ["hello world"])[0] == pytest.approx(1 - 1 / 11)
    assert score("mmmu-choice", ["The answer is (B).", "A"], ["B", "B"], ["Q?\nA. cat\nB. dog", "A dog?\n(A) cat\n(B) dog"]) == [1.0, 0.0]
    assert score("mathvista", ["so the answer is 3.50", "about 4"], ["3.5", "3"]) == [1.0, 0.0]
    assert score("format", ["<answer>4</answer>", "4"], ["4", "4"]) == [1.0, 0.0]
    totals, terms = build_reward({"exact": 1.0, "format": 0.2}, "^<answer>.*</answer>$")(["<answer>4</answer>", "4"], ["4", "4"], ["", ""])
    assert totals == [0.2, 1.0] and terms == {"exact": [0.0, 1.0], "format": [1.0, 0.0]}
    assert score(f"{toy / 'toy_reward.py'}:letters", ["rr", "xr"], ["red", "red"]) == [1.0, 0.5]


def test_grpo_quickstart_recipe_runs_a_few_steps_on_a_tiny_model(tmp_path):
    """The shipped recipe, on quickstart-style data (chart questions written out as records), with
    a tiny model in place of the quickstart checkpoint."""
    import yaml

    import vlmkit
    from vlmkit.data.synthetic.tasks import generate, write_question_records

    data = tmp_path / "data"
    generate(data, n_caption=1, n_instruct=6, n_test=3, seed=0)
    charts = json.loads(write_question_records(data).read_text())
    assert charts and all(r["task"] == "chart" and len(r["conversations"]) == 2 for r in charts)
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in charts)
    rec = yaml.safe_load((Path(vlmkit.__file__).parent / "recipes" / "grpo-quickstart.yaml").read_text())
    assert rec["train"]["stages"]["grpo"]["grpo"]["reward"] == "relaxed"
    rec["model"] = MODEL
    rec["train"].update(output_dir=str(tmp_path / "run"), data_dir=str(data), max_length=128,
                        eval={**rec["train"]["eval"], "every": 2, "limit": 3})
    rec["train"]["stages"]["grpo"].update(max_steps=2, batch_size=2)
    _, (result,) = run_training(load_config(rec), progress=False)
    assert result.steps == 2 and result.heldout is not None
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2] and "rewards/relaxed/mean" in rows[0]


def test_two_ddp_processes_train_a_grpo_stage(toy, tmp_path):
    rec = recipe(toy, tmp_path / "ddp", train={"distributed": "ddp"}, max_steps=2)
    (tmp_path / "ddp.json").write_text(json.dumps(rec))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(CHILD),
                        str(tmp_path / "ddp.json"), str(tmp_path / "ddp.out.json")],
                       check=False, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = read_jsonl(tmp_path / "ddp" / "metrics.jsonl")
    assert [r["world_size"] for r in rows if "reward" in r] == [2, 2]
    # Both ranks' completions count: 4 prompts x 8 each step.
    assert all(r["completions/mean_length"] > 0 for r in rows if "reward" in r)
    rec["train"]["distributed"] = "fsdp2"
    with pytest.raises(ValueError, match="loss grpo runs under DDP"):
        from vlmkit.train.objectives import GRPOObjective
        from vlmkit.train.distributed import DistContext

        GRPOObjective.check("grpo", load_config(rec), DistContext(world_size=2))
