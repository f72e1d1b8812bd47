"""`run_benchmark` in its own process, for the data-parallel evaluation test.

usage: [torchrun --nproc_per_node N] python tests/_eval_child.py DATA_DIR OUT_DIR BATCH_SIZE
A deterministic stand-in backend answers from the prompt and the image bytes, so one process and
N processes must agree exactly.
"""

from __future__ import annotations

import hashlib
import sys

import torch

torch.set_num_threads(1)


class DigestBackend:
    name = "digest"

    def generate(self, requests, max_new):
        out = []
        for prompt, images in requests:
            h = hashlib.sha256(str(prompt).encode())
            for im in images:
                h.update(im.tobytes())
            out.append(str(int(h.hexdigest(), 16) % 5))
        return out


def main() -> None:
    data, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    from vlmkit.eval.benchmarks import get_benchmark
    from vlmkit.eval.runner import run_benchmark

    bench = get_benchmark("chartqa")
    items = bench.load(data)
    run_benchmark(bench, items, DigestBackend(), out, model_spec="digest", data_dir=data, batch_size=batch, progress=False)


if __name__ == "__main__":
    main()
