"""The Hugging Face backend on a random tiny LLaVA folder: offline load, left-padded batching."""

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "eval_batching.py"


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("eval_batching", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_tiny_hf_llava(tmp_path_factory.mktemp("tiny-hf"))


def test_hf_backend_batched_equals_one_by_one(tiny_hf, tmp_path):
    from vlmkit.eval.backends import make_backend
    from vlmkit.eval.benchmarks import get_benchmark
    from vlmkit.eval.runner import run_benchmark
    from vlmkit.eval.synth import synth_bench

    backend = make_backend(str(tiny_hf))  # a bare HF folder is recognised
    assert backend.name.startswith("hf:")
    reqs = [("what is the value", [Image.new("RGB", (60, 40), "red")]),
            ("which category has the highest value of all of the value", [Image.new("RGB", (30, 50), "blue")])]
    batched = backend.generate(reqs, 4)
    assert batched == [backend.generate([r], 4)[0] for r in reqs]

    synth_bench("chartqa", tmp_path / "c", n=3, write_gold=False)
    bench = get_benchmark("chartqa")
    items = bench.load(tmp_path / "c")
    out = run_benchmark(bench, items, backend, tmp_path / "o", model_spec="hf", batch_size=4, max_new_tokens=3,
                        progress=False)
    assert out.generated == 6 and 0.0 <= out.result.overall <= 1.0
