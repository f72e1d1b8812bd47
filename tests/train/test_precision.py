"""`train.precision: auto` picks bf16 only where the device computes it natively (the CPU's flags),
records what it resolved to, and a recipe that forces bf16 on a CPU without it is warned at start
with the slowdown measured there."""

from __future__ import annotations

from pathlib import Path

import pytest

import vlmkit
from vlmkit.config import load_config
from vlmkit.core import precision
from vlmkit.train.loop import warn_emulated_bf16

RECIPE = {"train": {"precision": "auto", "stages": {}}}


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """A fake /proc/cpuinfo: `cpu(flags)` makes the process see a CPU with those flags."""

    def fake(flags: str):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n")
        monkeypatch.setattr(precision, "CPUINFO", info)
        precision.cpu_flags.cache_clear()

    yield fake
    precision.cpu_flags.cache_clear()


def test_auto_is_bf16_on_a_cpu_with_native_bf16(cpu):
    cpu("fpu sse2 avx2 avx512f avx512_bf16")
    assert load_config(RECIPE).train.precision == "bf16"
    cpu("fpu sse2 avx2 amx_bf16 amx_tile")
    assert load_config(RECIPE).train.precision == "bf16"


def test_auto_is_fp32_on_an_avx2_cpu(cpu):
    cpu("fpu sse2 avx2 fma")
    config = load_config(RECIPE)
    assert config.train.precision == "fp32"
    # What is saved with a checkpoint is the resolved value, and it reads back as itself.
    assert load_config({"train": config.train.model_dump(mode="json")}).train.precision == "fp32"


def test_auto_on_a_gpu_asks_the_gpu(cpu, monkeypatch):
    cpu("avx512_bf16")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_config(RECIPE, ["train.device=cuda"]).train.precision == "fp32"


def test_explicit_precision_is_kept(cpu):
    cpu("avx2")
    assert load_config(RECIPE, ["train.precision=bf16"]).train.precision == "bf16"
    assert load_config(RECIPE, ["train.precision=fp32"]).train.precision == "fp32"


def test_forced_bf16_on_an_avx2_cpu_is_warned_with_the_measured_slowdown(cpu, monkeypatch):
    cpu("avx2")
    monkeypatch.setattr("vlmkit.train.loop.bf16_slowdown", lambda: 41.7)
    with pytest.warns(UserWarning, match=r"no native bf16 .* runs 42x slower than fp32 here.*train\.precision=auto"):
        warn_emulated_bf16("bf16", "cpu")


def test_no_warning_where_bf16_is_native_or_not_used(cpu, recwarn):
    cpu("avx512_bf16")
    warn_emulated_bf16("bf16", "cpu")
    cpu("avx2")
    warn_emulated_bf16("fp32", "cpu")
    assert not [w for w in recwarn if "bf16" in str(w.message)]


def test_the_slowdown_is_measured():
    assert precision.bf16_slowdown(size=64, repeats=1) > 0


def test_the_quickstart_recipe_lets_the_cpu_decide(cpu):
    recipe = Path(vlmkit.__file__).parent / "recipes" / "quickstart.yaml"
    cpu("avx2")
    assert load_config(recipe).train.precision == "fp32"
    cpu("avx512_bf16")
    assert load_config(recipe).train.precision == "bf16"
