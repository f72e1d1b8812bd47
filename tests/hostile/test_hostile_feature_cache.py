"""The optional frozen-tower feature cache under a full disk and with bad entries: training goes
on (without storing), and an entry is used only for the image and tower it was computed from,
with the shapes it records and finite values; anything else is named, recomputed and rewritten."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlmkit.config import load_config
from vlmkit.train import features as F
from vlmkit.train.loop import run_training

from test_data_scale import data_dir, recipe  # noqa: F401  (fixture: 16 samples, one image each)
from test_train_scale import build


def train(out: Path, data_dir: Path, **train_cfg):
    cfg = load_config(recipe(out, str(data_dir / "stage2.json"), max_steps=4, batch_size=4, train=train_cfg))
    _, (res,) = run_training(cfg, model=build(), progress=False)
    return res.losses


def last_metrics(out: Path) -> dict:
    import json

    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):  # noqa: F811
    """Losses without a cache, and a cache folder filled by a first run (one entry per image)."""
    root = tmp_path_factory.mktemp("reference")
    plain = train(root / "plain", data_dir, feature_cache=False)
    cached = train(root / "cached", data_dir)
    assert cached == pytest.approx(plain, rel=1e-5)
    cache = root / "cached" / "feature_cache"
    assert len(list(cache.rglob("*.safetensors"))) == 16
    return plain, cache


def entries(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.safetensors"))


def meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


# ---- a full disk ------------------------------------------------------------------------------


def test_full_disk_under_the_feature_cache_falls_back_to_no_cache(data_dir, reference, tmp_path, monkeypatch, capsys):  # noqa: F811
    plain, _ = reference
    tries = []

    def disk_full(path, data):
        tries.append(path)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(F, "_write_atomic", disk_full)
    cache = tmp_path / "run" / "feature_cache"
    losses = train(tmp_path / "run", data_dir)  # raised OSError(ENOSPC) before the fix
    assert losses == pytest.approx(plain, rel=1e-5)
    out = capsys.readouterr().out
    assert f"feature cache {cache} cannot be written" in out and "No space left on device" in out
    assert out.count("cannot be written") == 1  # one warning, and no further tries
    assert len(tries) == 1
    assert entries(cache) == []


def test_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    """The real writer, failing half-way: nothing under the entry's name, no temporary left."""
    import builtins

    target = tmp_path / "ab" / "entry.safetensors"
    target.parent.mkdir()
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(F.os, "fdopen", lambda fd, mode: Full(real_open(fd, mode)))
    with pytest.raises(OSError, match="No space left"):
        F._write_atomic(target, b"x" * 1000)
    assert list(target.parent.iterdir()) == []


def test_feature_cache_folder_that_cannot_be_made_falls_back_to_no_cache(data_dir, reference, tmp_path, capsys):  # noqa: F811
    plain, _ = reference
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    losses = train(tmp_path / "run", data_dir, feature_cache_dir=str(blocker / "cache"))
    assert losses == pytest.approx(plain, rel=1e-5)
    assert f"feature cache {blocker / 'cache'} cannot be created" in capsys.readouterr().out


# ---- bad entries --------------------------------------------------------------------------------


@pytest.fixture
def cache_copy(reference, tmp_path) -> Path:
    _, cache = reference
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    return copy


def rerun_and_check(data_dir, reference, tmp_path, cache: Path, bad: list[Path], capsys) -> None:  # noqa: F811
    plain, _ = reference
    losses = train(tmp_path / "again", data_dir, feature_cache_dir=str(cache))
    assert losses == pytest.approx(plain, rel=1e-5)
    out = capsys.readouterr().out
    for path in bad:
        assert f"feature cache: {path} " in out and "recomputing it" in out
    stats = last_metrics(tmp_path / "again")
    assert stats["feature_cache_corrupt"] == len(bad) and stats["feature_cache_hits"] == 16 - len(bad)
    for path in bad:  # rewritten, and read back the next time
        assert meta(path)["format"] == F.FORMAT
        assert all(torch.isfinite(t).all() for t in load_file(str(path)).values())


def test_cached_entry_of_the_wrong_shape_is_recomputed(data_dir, reference, tmp_path, cache_copy, capsys):  # noqa: F811
    first, second = entries(cache_copy)[:2]
    # One with its record kept but a view cut short; one written without the record at all.
    views = load_file(str(first))
    save_file({k: v[:, :-1].contiguous() for k, v in views.items()}, str(first), metadata=meta(first))
    save_file({k: v[:, :, :-2].contiguous() for k, v in load_file(str(second)).items()}, str(second))
    rerun_and_check(data_dir, reference, tmp_path, cache_copy, [first, second], capsys)


def test_cached_entry_with_nan_is_recomputed(data_dir, reference, tmp_path, cache_copy, capsys):  # noqa: F811
    path = entries(cache_copy)[3]
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(path)).items()}, str(path), metadata=meta(path))
    rerun_and_check(data_dir, reference, tmp_path, cache_copy, [path], capsys)  # FloatingPointError before the fix


def test_swapped_cache_entries_are_recomputed(data_dir, reference, tmp_path, cache_copy, capsys):  # noqa: F811
    a, b = entries(cache_copy)[4:6]
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    rerun_and_check(data_dir, reference, tmp_path, cache_copy, [a, b], capsys)  # used silently before the fix


def test_entries_of_an_older_format_are_recomputed_not_misread(data_dir, reference, tmp_path, cache_copy, capsys):  # noqa: F811
    files = entries(cache_copy)
    for path in files:  # what vlmkit wrote before entries carried their record
        save_file(load_file(str(path)), str(path))
    plain, _ = reference
    assert train(tmp_path / "again", data_dir, feature_cache_dir=str(cache_copy)) == pytest.approx(plain, rel=1e-5)
    out = capsys.readouterr().out
    assert out.count("written by an older vlmkit") == F.MAX_REPORTS  # named, but not one line per file
    assert "further bad entries" in out
    assert last_metrics(tmp_path / "again")["feature_cache_corrupt"] == 16
    assert all(meta(p)["format"] == F.FORMAT for p in files)
