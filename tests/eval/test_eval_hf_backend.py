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


def test_vlmkit_and_hf_backends_answer_alike_on_one_exported_folder(tmp_path):
    """benchmarks/eval_batching.py's comparison: a LLaVA folder imported, exported back, and
    evaluated through the runner with `vlmkit:CKPT` and `hf:EXPORTED`, batched and one by one;
    every run's answers equal (it raises otherwise) and the timings are reported."""
    spec = importlib.util.spec_from_file_location("eval_batching", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shape = {"vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "image_size": 28, "patch_size": 14},
             "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "num_key_value_heads": 2}}
    rows = mod.compare_backends(tmp_path, n=4, batch_sizes=(4, 1), max_new_tokens=4, repeats=1, shape=shape)
    assert [r["batch"] for r in rows] == [4, 1] and all(r["same_answers"] and r["items"] == 4 for r in rows)
    assert all(r["vlmkit_s"] > 0 and r["hf_s"] > 0 and r["ratio"] > 0 for r in rows)
    assert rows[1]["vlmkit_vs_one_by_one"] == 1.0
