"""Lazy, sharded, resumable input from JSON, parquet and WebDataset sources, mixtures,
frozen-tower features on disk, and the errors for bad sources."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from vlmkit.config import ConfigError, load_config
from vlmkit.data.sources import DataSourceError, Mixture, Source, micro_batches, open_source
from vlmkit.train.loop import run_training
from vlmkit.train.preflight import DataError
from vlmkit.utils import read_jsonl

from test_train_scale import CHILD, MODEL, _child, build

N_SHARDS = 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The same 16 samples as LLaVA JSON, as two parquet shards (images embedded) and as two
    WebDataset tar shards."""
    import datasets

    from vlmkit.data.synthetic.tasks import generate

    out = tmp_path_factory.mktemp("sources")
    generate(out, n_caption=4, n_instruct=16, n_test=2, seed=3)
    records = json.loads((out / "stage2.json").read_text())
    (out / "parquet").mkdir()
    (out / "wds").mkdir()
    per = (len(records) + N_SHARDS - 1) // N_SHARDS
    for s in range(N_SHARDS):
        part = records[s * per : (s + 1) * per]
        table = {"id": [r["id"] for r in part], "conversations": [r["conversations"] for r in part],
                 "images": [[{"bytes": (out / r["image"]).read_bytes(), "path": None}] for r in part]}
        ds = datasets.Dataset.from_dict(table).cast_column("images", datasets.Sequence(datasets.Image()))
        ds.to_parquet(str(out / "parquet" / f"train-{s:05d}.parquet"))
        with tarfile.open(out / "wds" / f"shard-{s:05d}.tar", "w") as tar:
            for j, r in enumerate(part):
                key = f"s{s * per + j:06d}"
                record = {k: v for k, v in r.items() if k != "image"}
                for name, data in ((f"{key}.json", json.dumps(record).encode()),
                                   (f"{key}{Path(r['image']).suffix}", (out / r["image"]).read_bytes())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return out


def recipe(out: Path, data, train: dict | None = None, **stage) -> dict:
    s = {"data": data, "trainable": ["connector", "llm"], "lr": 3e-3, "batch_size": 4, "max_steps": 4}
    s.update(stage)
    return {"model": MODEL, "train": {"output_dir": str(out), "stages": {"sft": s}, **(train or {})}}


def test_json_parquet_and_webdataset_sources_give_identical_losses(data_dir, tmp_path):
    losses = {}
    for name, data in (("json", str(data_dir / "stage2.json")), ("parquet", str(data_dir / "parquet")),
                       ("wds", str(data_dir / "wds"))):
        cfg = load_config(recipe(tmp_path / name, data, max_steps=5, train={"feature_cache": False}))
        _, (res,) = run_training(cfg, model=build(), progress=False)
        losses[name] = res.losses
    assert losses["json"] == losses["parquet"] == losses["wds"]
    assert len(losses["json"]) == 5


def test_sources_index_without_decoding_and_read_records_lazily(data_dir):
    json_src = open_source(data_dir / "stage2.json")
    tar_src = open_source(data_dir / "wds")
    pq_src = open_source(data_dir / "parquet")
    assert len(json_src) == len(tar_src) == len(pq_src) == 16
    a, b, c = json_src.record(7), tar_src.record(7), pq_src.record(7)
    assert [m.content for m in a.messages] == [m.content for m in b.messages] == [m.content for m in c.messages]
    assert a.images[0].read_bytes() == b.images[0] == c.images[0]


def test_the_cauldron_layout_trains(data_dir, tmp_path):
    """the_cauldron's parquet layout: `images` (embedded) + `texts: [{user, assistant}]`."""
    import datasets

    records = json.loads((data_dir / "stage2.json").read_text())[:6]
    table = {"images": [[{"bytes": (data_dir / r["image"]).read_bytes(), "path": None}] for r in records],
             "texts": [[{"user": r["conversations"][0]["value"].replace("<image>", "").strip(),
                         "assistant": r["conversations"][1]["value"], "source": "synth"}] for r in records]}
    (tmp_path / "cauldron").mkdir()
    ds = datasets.Dataset.from_dict(table).cast_column("images", datasets.Sequence(datasets.Image()))
    ds.to_parquet(str(tmp_path / "cauldron" / "train-00000-of-00001.parquet"))
    source = open_source(tmp_path / "cauldron")
    sample = source.record(2)
    assert sample.messages[0].content.startswith("<image>") and sample.images == [(data_dir / records[2]["image"]).read_bytes()]
    assert sample.id == "#2"
    cfg = load_config(recipe(tmp_path / "run", str(tmp_path / "cauldron"), max_steps=2, batch_size=2))
    _, (res,) = run_training(cfg, model=build(), progress=False)
    assert len(res.losses) == 2 and all(loss > 0 for loss in res.losses)


def test_mixture_realised_shares_match_the_weights():
    class Fake(Source):  # a source of n records; what a source declares (streaming, ...) comes from the base
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    mixture = Mixture([Fake(50), Fake(200), Fake(30)], [0.5, 0.3, 0.2], ["a", "b", "c"])
    it = micro_batches(mixture, 10, seed=1, stage="sft")
    drawn = torch.tensor([g for _ in range(1000) for g in next(it)])
    shares = torch.bincount(mixture.source_of(drawn), minlength=3).double() / len(drawn)
    assert shares.tolist() == pytest.approx([0.5, 0.3, 0.2], abs=0.01)
    # Within a source, every record is drawn once before any repeats.
    first_a = drawn[mixture.source_of(drawn) == 0][:50]
    assert sorted(first_a.tolist()) == list(range(50))
    # A pure function of the seed.
    again = micro_batches(mixture, 10, seed=1, stage="sft")
    assert [next(again) for _ in range(5)] == [drawn[i * 10 : (i + 1) * 10].tolist() for i in range(5)]


def test_mixture_trains_and_logs_its_shares(data_dir, tmp_path):
    data = [{"path": str(data_dir / "stage2.json"), "weight": 3}, {"path": str(data_dir / "wds"), "weight": 1},
            {"path": str(data_dir / "parquet"), "weight": 1, "streaming": True}]
    cfg = load_config(recipe(tmp_path / "run", data, max_steps=6, batch_size=8, train={"num_workers": 1}))
    _, (res,) = run_training(cfg, model=build(), progress=False)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in records if "step" in r]
    assert len(steps) == 6 and set(steps[-1]["source_shares"]) == {d["path"] for d in data}
    final = next(r for r in records if r.get("event") == "source_shares")
    assert final["weights"] == [0.6, 0.2, 0.2]
    # 48 draws: the largest-remainder split keeps each share within one draw of its weight.
    assert list(final["shares"].values()) == pytest.approx([0.6, 0.2, 0.2], abs=1 / 48)


def test_sigkill_mid_epoch_with_two_workers_then_resume_is_bitwise_equal(data_dir, tmp_path):
    base = recipe(tmp_path / "full", str(data_dir / "stage2.json"), train={"save_every": 2, "num_workers": 2}, max_steps=6,
                  batch_size=3)
    r = _child(base, tmp_path, "full")
    assert r.returncode == 0, r.stderr[-2000:]
    cut = json.loads(json.dumps(base))
    cut["train"]["output_dir"] = str(tmp_path / "cut")
    r = _child(cut, tmp_path, "cut1", "kill-at-log=3")  # mid-epoch: 16 records, 3 per micro-batch
    assert r.returncode == -9
    r = _child(cut, tmp_path, "cut2")
    assert r.returncode == 0 and "resuming at step 2/6" in r.stdout, r.stderr[-2000:]
    full = json.loads((tmp_path / "full.out.json").read_text())
    resumed = json.loads((tmp_path / "cut2.out.json").read_text())
    assert resumed["losses"]["sft"] == full["losses"]["sft"]
    assert resumed["weights"] == full["weights"]
    # Workers change nothing: the in-process pipeline gives the same run.
    _, (res,) = run_training(load_config(recipe(tmp_path / "w0", str(data_dir / "stage2.json"), max_steps=6, batch_size=3)),
                             model=None, progress=False)
    assert res.losses == full["losses"]["sft"]


def test_sigterm_to_the_process_group_with_workers_saves_and_resumes(data_dir, tmp_path):
    base = recipe(tmp_path / "run", str(data_dir / "wds"), train={"num_workers": 2}, max_steps=5)
    r = _child(base, tmp_path, "term", "termgroup-at-log=2")
    assert r.returncode == 143, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "saved step 2" in r.stdout
    r = _child(base, tmp_path, "again")
    assert r.returncode == 0 and "resuming at step 2/5" in r.stdout, r.stderr[-2000:]
    ref = recipe(tmp_path / "ref", str(data_dir / "wds"), max_steps=5)
    r = _child(ref, tmp_path, "ref")
    assert r.returncode == 0
    assert json.loads((tmp_path / "again.out.json").read_text()) == json.loads((tmp_path / "ref.out.json").read_text())


def test_two_gloo_processes_over_sharded_data_match_one(data_dir, tmp_path):
    one = recipe(tmp_path / "one", str(data_dir / "parquet"), max_steps=3, batch_size=4, grad_accum=2, train={"num_workers": 1})
    torch.manual_seed(0)
    _, (res,) = run_training(load_config(one), progress=False)
    two = json.loads(json.dumps(one))
    two["train"]["output_dir"] = str(tmp_path / "two")
    (tmp_path / "two.json").write_text(json.dumps(two))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(CHILD),
                        str(tmp_path / "two.json"), str(tmp_path / "two.out.json")],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads((tmp_path / "two.out.json").read_text())
    assert out["losses"]["sft"] == pytest.approx(res.losses, rel=1e-5)


def test_disk_feature_cache_matches_no_cache_and_recomputes_a_corrupt_file(data_dir, tmp_path):
    losses = {}
    for cache in (False, True):
        cfg = load_config(recipe(tmp_path / f"c{cache}", str(data_dir / "stage2.json"), max_steps=8, batch_size=4,
                                 train={"feature_cache": cache}))
        _, (res,) = run_training(cfg, model=build(), progress=False)
        losses[cache] = res.losses
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    cache_dir = tmp_path / "cTrue" / "feature_cache"
    files = sorted(cache_dir.rglob("*.safetensors"))
    assert len(files) == 16  # one per distinct image
    last = read_jsonl(tmp_path / "cTrue" / "metrics.jsonl")[-1]
    assert last["feature_cache_misses"] == 16 and last["feature_cache_hits"] == 16  # the second epoch reads them back
    # A torn file is noticed, recomputed and rewritten; the run is unchanged.
    files[0].write_bytes(files[0].read_bytes()[:40])
    cfg = load_config(recipe(tmp_path / "again", str(data_dir / "stage2.json"), max_steps=8, batch_size=4,
                             train={"feature_cache_dir": str(cache_dir)}))
    _, (res,) = run_training(cfg, model=build(), progress=False)
    assert res.losses == pytest.approx(losses[False], rel=1e-5)
    last = read_jsonl(tmp_path / "again" / "metrics.jsonl")[-1]
    assert last["feature_cache_corrupt"] == 1 and last["feature_cache_hits"] == 31
    from safetensors.torch import load_file

    assert load_file(str(files[0]))  # rewritten whole


# ---- bad sources ------------------------------------------------------------------------------

def _check(tmp_path, data, **train):
    cfg = load_config(recipe(tmp_path / "run", data, train=train or None))
    run_training(cfg, model=build(), progress=False)


def test_truncated_tar_shard_is_named(data_dir, tmp_path):
    shard = tmp_path / "cut.tar"
    whole = (data_dir / "wds" / "shard-00001.tar").read_bytes()
    shard.write_bytes(whole[: len(whole) // 2 + 100])
    with pytest.raises(DataError, match=r"cut\.tar: truncated or corrupt tar shard"):
        _check(tmp_path, str(shard))
    assert not (tmp_path / "run").exists()


def test_parquet_shard_without_image_column_is_named(tmp_path):
    import datasets

    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_dict({"texts": [[{"user": "hi", "assistant": "yo"}]]}).to_parquet(str(tmp_path / "pq" / "a.parquet"))
    with pytest.raises(DataError, match=r"a\.parquet: no image column"):
        _check(tmp_path, str(tmp_path / "pq"))


def test_mixture_weight_must_be_positive(data_dir, tmp_path):
    for w in (0, -1):
        with pytest.raises(ConfigError, match=r"train\.stages\.sft\.data\.1\.weight: Input should be greater than 0"):
            load_config(recipe(tmp_path, [{"path": str(data_dir / "stage2.json")}, {"path": str(data_dir / "wds"), "weight": w}]))
    with pytest.raises(DataSourceError, match="weights must be > 0"):
        Mixture([], [0.0], ["x"])


def test_empty_and_missing_sources_are_named(data_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl holds no records \(empty source\)"):
        _check(tmp_path, [{"path": str(data_dir / "stage2.json")}, {"path": str(tmp_path / "empty.jsonl")}])
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    with pytest.raises(DataError, match=r"empty\.tar holds no records"):
        _check(tmp_path, str(tmp_path / "empty.tar"))
    with pytest.raises(DataError, match=r"data file not found: .*nowhere\.parquet"):
        _check(tmp_path, [{"path": str(data_dir / "stage2.json")}, {"path": str(tmp_path / "nowhere.parquet")}])


# ---- data-parallel evaluation -----------------------------------------------------------------

def test_two_process_eval_equals_one_process(tmp_path):
    from vlmkit.eval.synth import synth_bench

    synth_bench("chartqa", tmp_path / "bench", n=10)
    child = Path(__file__).resolve().parents[1] / "_eval_child.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(child), str(tmp_path / "bench"), str(tmp_path / "one"), "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    # A leftover rank cache from an interrupted run counts as cached and is merged.
    (tmp_path / "two").mkdir()
    first = (tmp_path / "one" / "predictions.jsonl").read_text().splitlines()[0]
    (tmp_path / "two" / "predictions.rank1.jsonl").write_text(first + "\n")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(child),
                          str(tmp_path / "bench"), str(tmp_path / "two"), "2"], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    preds = {}
    for name in ("one", "two"):
        lines = [json.loads(x) for x in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
        preds[name] = {r["id"]: r["prediction"] for r in lines}
        assert len(lines) == len(preds[name])  # nothing written twice
    assert preds["one"] == preds["two"] and len(preds["one"]) > 0
    assert not list((tmp_path / "two").glob("predictions.rank*.jsonl"))
    r1, r2 = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    drop = ("generation_seconds", "samples_per_s", "generated", "reused_from_cache", "data")
    assert {k: v for k, v in r1.items() if k not in drop} == {k: v for k, v in r2.items() if k not in drop}
    assert r2["reused_from_cache"] == 1 and r2["generated"] == r1["generated"] - 1


def test_streamed_parquet_is_deterministic_resumable_and_whole_per_epoch(data_dir, tmp_path):
    from vlmkit.data.pipeline import RankSampler

    source = open_source(data_dir / "parquet", streaming=True, shuffle_buffer=4)
    mixture = Mixture([source], [1.0], ["pq"])

    def ids(sampler, n):
        it = iter(sampler)
        return [[source.row_sample(row, 0).id for row in next(it)[2]] for _ in range(n)]

    run = ids(RankSampler(mixture, 4, 0, "sft"), 8)  # two epochs of 16 rows
    first, second = sorted(i for b in run[:4] for i in b), sorted(i for b in run[4:] for i in b)
    assert first == second == sorted(json.loads((data_dir / "stage2.json").read_text())[i]["id"] for i in range(16))
    assert run[:4] != run[4:]  # each epoch reshuffles
    assert ids(RankSampler(mixture, 4, 0, "sft", skip=5), 3) == run[5:]  # resume = the same tail
    # Workers do not change the run.
    losses = []
    for workers in (0, 2):
        data = [{"path": str(data_dir / "parquet"), "streaming": True, "shuffle_buffer": 4}]
        cfg = load_config(recipe(tmp_path / f"w{workers}", data, max_steps=5, train={"num_workers": workers}))
        _, (res,) = run_training(cfg, model=build(), progress=False)
        losses.append(res.losses)
    assert losses[0] == losses[1] and len(losses[0]) == 5


def test_misspelt_source_key_suggests_the_real_one(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.stages\.sft\.data\.0\.wieght: unknown key; did you mean 'weight'\?"):
        load_config(recipe(tmp_path, [{"path": "a.json", "wieght": 2}]))


def test_torchrun_eval_cli_equals_one_process(data_dir, tmp_path):
    """`torchrun -m vlmkit.cli eval run` with a vlmkit checkpoint: same predictions and score."""
    from vlmkit.eval.synth import synth_bench

    cfg = load_config(recipe(tmp_path / "run", str(data_dir / "stage2.json"), max_steps=1))
    run_training(cfg, model=build(), progress=False)
    synth_bench("chartqa", tmp_path / "bench", n=8)
    args = ["eval", "run", "-b", "chartqa", "-d", str(tmp_path / "bench"), "-m", f"vlmkit:{tmp_path / 'run' / 'checkpoints' / 'sft'}",
            "--batch-size", "2", "--max-new-tokens", "4", "--no-progress", "--json"]  # 16 items: 2 ranks x 4 full batches
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = subprocess.run([sys.executable, "-m", "vlmkit.cli", *args, "-o", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vlmkit.cli",
                          *args, "-o", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    reports = [json.loads(r.stdout[r.stdout.index("{"):]) for r in (one, two)]
    assert reports[0]["overall"] == reports[1]["overall"] and reports[0]["generated"] == reports[1]["generated"] > 0
    preds = [{json.loads(x)["id"]: json.loads(x)["prediction"] for x in (tmp_path / n / "predictions.jsonl").read_text().splitlines()}
             for n in ("one", "two")]
    assert preds[0] == preds[1] and len(preds[0]) == reports[0]["generated"]
