"""benchmarks/gpu_checks.sh --device cpu --quick: every block that is not CUDA-only (generation and
eval of imported models, the LoRA step, the server comparison and int8) runs on the CPU with tiny
random models, passes and writes its JSON results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openai")
pytest.importorskip("torchao")

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_checks_server_blocks_run_on_cpu_quick(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(["bash", "benchmarks/gpu_checks.sh", "--device", "cpu", "--quick"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    for step in ("wait_generate_eval", "lora_step", "serve_load", "serve_int8"):
        assert f"== {step}" in out.stdout
        assert "rc=0" in out.stdout.split(f"== {step}", 1)[1].splitlines()[1], out.stdout
    load = json.loads((tmp_path / "serve_load.jsonl").read_text().splitlines()[-1])
    assert set(load["servers"]) == {"static", "continuous"}
    for server in load["servers"].values():
        assert server["errors"] == 0 and server["requests"] == load["users"] * load["questions"]
        assert server["ttft_p50"] <= server["latency_p50"]
    assert load["caches"]["feature_cache"]["entries"] > 0 and load["caches"]["prefix_tokens_reused"] > 0
    int8 = json.loads((tmp_path / "serve_int8.jsonl").read_text().splitlines()[-1])
    assert set(int8["modes"]) == {"fp32", "int8"} and 0 <= int8["agreement"] <= 1 and int8["items"] == 8
