"""Issue 6: DPO, packing with isolated attention, full-state resume, torchrun data parallelism,
telemetry, and the bad-input errors that must come before any lost work."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlmkit.config import load_config
from vlmkit.data.collate import collate, pack
from vlmkit.data.formats import BadRecordError, read_llava_json
from vlmkit.data.preference import read_preference_file
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.processing import build_chat_processor
from vlmkit import checkpoint as ckpt
from vlmkit.train.losses import decoder_hidden, dpo_loss, sequence_logps
from vlmkit.train.loop import run_training
from vlmkit.utils import read_jsonl
from vlmkit.processing.base import VisualBatch

from _tiny import TINY_SECTIONS as MODEL  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = Path(__file__).resolve().parents[2]
CHILD = ROOT / "tests" / "_train_child.py"



@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from vlmkit.data.synthetic.tasks import generate

    out = tmp_path_factory.mktemp("scale")
    generate(out, n_caption=4, n_instruct=16, n_test=2, seed=3)
    stage2 = json.loads((out / "stage2.json").read_text())
    # Preference pairs in the three formats over the same images.
    trl, rlaif, rlhf = [], [], []
    for i, r in enumerate(stage2[:8]):
        q = r["conversations"][0]["value"].replace("<image>\n", "").replace("<image>", "")
        good, bad = r["conversations"][1]["value"], "I cannot tell."
        trl.append({"id": f"t{i}", "images": [r["image"]],
                    "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                    "chosen": [{"role": "assistant", "content": [{"type": "text", "text": good}]}],
                    "rejected": [{"role": "assistant", "content": [{"type": "text", "text": bad}]}]})
        rlaif.append({"id": f"r{i}", "image": r["image"], "question": q, "chosen": good, "rejected": bad})
        rlhf.append({"id": f"h{i}", "image": r["image"], "conversations": [{"from": "human", "value": "<image>\n" + q}],
                     "output_1": {"from": "llava", "value": bad}, "output_2": {"from": "llava", "value": good}, "preference": 2})
    for name, recs in (("trl", trl), ("rlaif", rlaif), ("rlhf", rlhf)):
        (out / f"pref_{name}.json").write_text(json.dumps(recs))
    return out


def recipe(data_dir: Path, out: Path, train: dict | None = None, **stage) -> dict:
    s = {"data": str(data_dir / "stage2.json"), "trainable": ["connector", "llm"], "lr": 3e-3, "batch_size": 4, "max_steps": 4}
    s.update(stage)
    return {"model": MODEL, "train": {"output_dir": str(out), "stages": {"sft": s}, **(train or {})}}


def build(seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    return VisionLanguageModel.build(load_config({"model": MODEL}).model, pretrained=False)


# ---- DPO ------------------------------------------------------------------------------------

def test_dpo_loss_matches_hand_computation():
    # beta 0.5; policy margin (-1) - (-3) = 2; reference margin (-2) - (-2) = 0
    # loss = -log sigmoid(0.5 * 2) = log(1 + e^-1) = 0.3132617
    terms = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    assert terms.losses.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-7)
    assert terms.chosen_rewards.item() == pytest.approx(0.5) and terms.rejected_rewards.item() == pytest.approx(-0.5)
    # Conservative DPO with e = 0.1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1)
    smoothed = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5, label_smoothing=0.1)
    assert smoothed.losses.item() == pytest.approx(0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1)), abs=1e-6)


def test_sequence_logps_equal_full_log_softmax(data_dir):
    model = build()
    proc = build_chat_processor(model, 512)
    samples = [proc.encode(s) for s in read_llava_json(data_dir / "stage2.json")[:3]]
    batch = collate(samples, model.tokenizer.pad_token_id)
    with torch.no_grad():
        logps, counts = sequence_logps(decoder_hidden(model, batch), batch, model.llm.get_output_embeddings(), chunk=7)
        logits = model(batch.input_ids, batch.visuals, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    full = torch.log_softmax(logits.float(), -1)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        want = [(t, int(s.labels[t + 1])) for t in range(n - 1) if s.labels[t + 1] >= 0]
        assert counts[i] == len(want)
        assert logps[i].item() == pytest.approx(sum(full[i, t, y].item() for t, y in want), rel=1e-5)


def test_preference_formats_read_alike(data_dir):
    pairs = {name: read_preference_file(data_dir / f"pref_{name}.json") for name in ("trl", "rlaif", "rlhf")}
    for a, b, c in zip(*pairs.values()):
        assert a.chosen == b.chosen == c.chosen and a.rejected == b.rejected == c.rejected
        assert a.images == b.images == c.images
        assert a.prompt[-1].content == b.prompt[-1].content == c.prompt[-1].content
        assert a.prompt[-1].content.startswith("<image>")


@pytest.mark.parametrize("record, reason", [
    ({"id": "x", "prompt": "hi", "chosen": "a"}, r"missing \['rejected'\]"),
    ({"id": "x", "image": "a.png", "question": "q", "rejected": "b"}, r"missing \['chosen'\]"),
    ({"id": "x", "conversations": [{"from": "human", "value": "q"}], "output_1": "a", "preference": 1}, r"missing \['output_2'\]"),
    ({"id": "x", "conversations": [{"from": "human", "value": "q"}], "output_1": "a", "output_2": "b", "preference": 3}, "must be 1 or 2"),
])
def test_preference_record_with_a_missing_side_is_named(tmp_path, record, reason):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([record]))
    (bad,) = read_preference_file(path)
    assert isinstance(bad, BadRecordError) and "'x'" in str(bad)
    with pytest.raises(BadRecordError, match=reason):
        raise bad


def test_dpo_stage_errors_on_missing_side_before_training(data_dir, tmp_path):
    recs = json.loads((data_dir / "pref_rlaif.json").read_text())
    del recs[5]["rejected"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recs))
    for r in recs:
        r["image"] = str(data_dir / r["image"])
    bad.write_text(json.dumps(recs))
    cfg = load_config(recipe(data_dir, tmp_path / "run", data=str(bad), loss="dpo"))
    with pytest.raises(BadRecordError, match=r"'r5'.*rejected"):
        run_training(cfg, model=build(), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dpo_trains_with_either_reference_and_logs_rewards(data_dir, tmp_path):
    results = {}
    for ref in ("precompute", "model"):
        cfg = load_config(recipe(data_dir, tmp_path / ref, data=str(data_dir / "pref_trl.json"), loss="dpo",
                                 dpo={"beta": 0.5, "reference": ref}, max_steps=4, lr=1e-2))
        _, (res,) = run_training(cfg, model=build(), progress=False)
        results[ref] = res.losses
        records = read_jsonl(tmp_path / ref / "metrics.jsonl")
        assert {"chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy"} <= set(records[0])
    # At the first step the policy is the reference: every margin is 0 and the loss is log 2.
    assert results["precompute"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert results["precompute"] == pytest.approx(results["model"], rel=1e-5)
    assert results["precompute"][-1] < math.log(2)
    assert records[-1]["reward_accuracy"] > 0.5


# ---- packing --------------------------------------------------------------------------------

def test_packed_rows_are_isolated(data_dir):
    model = build()
    proc = build_chat_processor(model, 512)
    samples = [proc.encode(s) for s in read_llava_json(data_dir / "stage2.json")[:6]]
    padded = collate(samples, model.tokenizer.pad_token_id)
    packed = pack(samples, model.tokenizer.pad_token_id, capacity=2 * max(len(s.input_ids) for s in samples), max_images=2)
    assert packed.input_ids.shape[0] == 3 and packed.real_tokens == padded.real_tokens
    assert packed.input_ids.numel() <= padded.input_ids.numel()
    with torch.no_grad():
        h_pad, h_pack = decoder_hidden(model, padded), decoder_hidden(model, packed)
    for i in range(len(samples)):
        a, b = h_pad[padded.segments == i], h_pack[packed.segments == i]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="max_images_per_pack"):
        pack(samples, 0, capacity=1024, max_images=0)


@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_packed_and_unpacked_training_give_the_same_loss(data_dir, tmp_path, reduction):
    losses = {}
    for packing in (False, True):
        cfg = load_config(recipe(data_dir, tmp_path / f"{packing}", packing=packing, loss_reduction=reduction, grad_accum=2,
                                 max_steps=3, batch_size=4, pack_length=1024))
        _, (res,) = run_training(cfg, model=build(), progress=False)
        losses[packing] = res.losses
        records = read_jsonl(tmp_path / f"{packing}" / "metrics.jsonl")
        if packing:
            assert all(r["padding_share"] == 0 for r in records)  # one row per micro-batch: no padding at all
        else:
            assert all(r["padding_share"] > 0 for r in records)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


# ---- resume ---------------------------------------------------------------------------------

def _child(recipe_dict: dict, tmp: Path, tag: str, *flags: str, env=None) -> subprocess.CompletedProcess:
    rpath = tmp / f"{tag}.recipe.json"
    rpath.write_text(json.dumps(recipe_dict))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(CHILD), str(rpath), str(tmp / f"{tag}.out.json"), *flags],
                          capture_output=True, text=True, env=env, timeout=300)


def test_sigkill_and_resume_reproduce_the_uninterrupted_run_bit_for_bit(data_dir, tmp_path):
    base = recipe(data_dir, tmp_path / "full", train={"save_every": 2, "keep_last": 2}, max_steps=8, batch_size=4)
    torch.manual_seed(0)
    full_model, (full,) = run_training(load_config(base), model=None, progress=False)

    cut = json.loads(json.dumps(base))
    cut["train"]["output_dir"] = str(tmp_path / "cut")
    # Killed while writing the step-4 checkpoint: the torn one is never used, step 2 is.
    r = _child(cut, tmp_path, "cut1", "kill-in-save=4")
    assert r.returncode == -9
    assert ckpt.latest_resumable(tmp_path / "cut" / "checkpoints" / "sft").name == "sft-step-00000002"
    # Resumed, then killed again mid-way (after step 7, whose work since step 6 is lost).
    r = _child(cut, tmp_path, "cut2", "kill-at-log=7")
    assert r.returncode == -9 and "resuming at step 2/8" in r.stdout
    kept = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir() if not p.name.startswith("."))
    assert kept == ["sft-last", "sft-step-00000004"]  # keep_last=2
    r = _child(cut, tmp_path, "cut3")
    assert r.returncode == 0 and "resuming at step 6/8" in r.stdout, r.stderr[-2000:]

    resumed = json.loads((tmp_path / "cut3.out.json").read_text())
    assert resumed["losses"]["sft"] == full.losses  # exact float equality, step by step
    digest = hashlib.sha256()
    for key, value in sorted(full_model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().contiguous().numpy().tobytes())
    assert resumed["weights"] == digest.hexdigest()


def test_sigterm_saves_and_exits_cleanly(data_dir, tmp_path):
    base = recipe(data_dir, tmp_path / "run", max_steps=5)
    r = _child(base, tmp_path, "term", "term-at-log=3")
    assert r.returncode == 143, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "SIGTERM received; saved step 3" in r.stdout
    last = tmp_path / "run" / "checkpoints" / "sft-last"
    assert json.loads((last / "meta.json").read_text())["step"] == 3
    r = _child(base, tmp_path, "again")
    assert r.returncode == 0 and "resuming at step 3/5" in r.stdout
    ref = recipe(data_dir, tmp_path / "ref", max_steps=5)
    _, (res,) = run_training(load_config(ref), model=None, progress=False)
    assert json.loads((tmp_path / "again.out.json").read_text())["losses"]["sft"] == res.losses


def test_resume_from_a_checkpoint_of_another_config_is_refused(data_dir, tmp_path):
    r = recipe(data_dir, tmp_path / "run", train={"save_every": 2}, max_steps=4)
    cfg = load_config(r)
    # Leave a periodic checkpoint behind, as a killed run would.
    model = build()
    model.set_trainable(["connector", "llm"])
    ckpt.rotate_and_save(tmp_path / "run" / "checkpoints" / "sft", 2, 2,
                         lambda p: ckpt.save_checkpoint(p, model, cfg, {"step": 2}, {"step": 2}))
    r["train"]["stages"]["sft"]["lr"] = 1e-3
    r["model"] = json.loads(json.dumps(MODEL))
    r["model"]["llm"]["config"]["num_hidden_layers"] = 3
    with pytest.raises(ckpt.ResumeMismatchError) as err:
        run_training(load_config(r), model=build(), progress=False)
    assert "train.stages.sft.lr: checkpoint 0.003, now 0.001" in str(err.value)
    assert "model.llm.config.num_hidden_layers: checkpoint 2, now 3" in str(err.value)
    assert (tmp_path / "run" / "checkpoints" / "sft-last").is_dir()  # nothing was lost


# ---- distributed ----------------------------------------------------------------------------

def test_world_size_that_does_not_divide_the_batch_is_refused(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(recipe(data_dir, tmp_path / "run", batch_size=3))
    with pytest.raises(ValueError, match="batch_size 3 .* world size 2"):
        run_training(cfg, model=build(), progress=False)


def test_two_gloo_processes_match_one_with_the_same_global_batch(data_dir, tmp_path):
    one = recipe(data_dir, tmp_path / "one", max_steps=3, batch_size=4, grad_accum=2)
    _, (res,) = run_training(load_config(one), progress=False)
    paths = []
    for strategy in ("ddp", "fsdp2"):
        two = json.loads(json.dumps(one))
        two["train"].update(output_dir=str(tmp_path / strategy), distributed=strategy)
        (tmp_path / f"{strategy}.json").write_text(json.dumps(two))
        paths.append(tmp_path / strategy)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(CHILD),
                        ",".join(f"{p}.json" for p in paths), ",".join(f"{p}.out.json" for p in paths)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for path in paths:
        out = json.loads(Path(f"{path}.out.json").read_text())
        assert out["losses"]["sft"] == pytest.approx(res.losses, rel=1e-5), path.name
        records = read_jsonl(path / "metrics.jsonl")
        assert len(records) == 3 and records[0]["world_size"] == 2
    # Rank 0 wrote a whole checkpoint (FSDP2 shards gathered) that loads in one process.
    model, _ = ckpt.load_checkpoint(paths[1] / "checkpoints" / "sft")
    ddp_model, _ = ckpt.load_checkpoint(paths[0] / "checkpoints" / "sft")
    for (k, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(ddp_model.state_dict().items())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


# ---- telemetry ------------------------------------------------------------------------------

def test_telemetry_is_logged(data_dir, tmp_path):
    r = recipe(data_dir, tmp_path / "run", max_steps=2)
    r["train"]["peak_tflops"] = 1.0
    run_training(load_config(r), model=build(), progress=False)
    rec = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    for key in ("tokens_per_s", "images_per_s", "data_s", "compute_s", "data_share", "mfu", "peak_memory_gb", "padding_share"):
        assert key in rec and rec[key] >= 0, key
    assert rec["images"] == 4 and rec["tokens"] > rec["supervised_tokens"] > 0
    assert 0 < rec["mfu"] < 1 and rec["compute_s"] > 0
