"""A training run in its own process, for kill / resume / torchrun tests.

usage: python tests/_train_child.py RECIPE.json[,RECIPE2.json] OUT.json[,OUT2.json] [kill-at-log=N] [kill-in-save=N] [term-at-log=N]

Several recipes run one after another in the same processes (under torchrun, in one process
group that this script opens, which also covers a group opened by the caller).

kill-at-log=N: SIGKILL itself right after logging step N (work since the last save is lost).
kill-in-save=N: SIGKILL itself while writing the trainer state of the step-N checkpoint.
term-at-log=N: SIGTERM itself after logging step N (the loop must save and exit with 143).
termgroup-at-log=N: SIGTERM its whole process group (DataLoader workers included) after step N.
Writes the stage losses and a digest of the final weights to OUT.json (rank 0 only).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys

import torch

torch.set_num_threads(1)


def main() -> None:
    recipe_paths, out_paths, *flags = sys.argv[1:]
    opts = dict(f.split("=") for f in flags)
    from vlmkit.config import load_config
    from vlmkit import checkpoint as ckpt
    from vlmkit.train.loop import run_training
    from vlmkit.utils import JsonlLogger

    real_log = JsonlLogger.log

    def log(self, record):
        real_log(self, record)
        if str(record.get("step")) == opts.get("kill-at-log"):
            os.kill(os.getpid(), signal.SIGKILL)
        if str(record.get("step")) == opts.get("term-at-log"):
            os.kill(os.getpid(), signal.SIGTERM)
        if str(record.get("step")) == opts.get("termgroup-at-log"):
            os.killpg(os.getpgid(0), signal.SIGTERM)  # as a scheduler does: workers get it too

    if "termgroup-at-log" in opts:
        os.setpgrp()  # a group of its own (and its DataLoader workers'), so the test runner is spared
    JsonlLogger.log = log
    real_save = torch.save

    def save(obj, path, *a, **k):
        if isinstance(obj, dict) and str(obj.get("step")) == opts.get("kill-in-save"):
            with open(path, "wb") as f:
                f.write(b"torn")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, path, *a, **k)

    torch.save = save
    ckpt.torch.save = save

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    for recipe_path, out_path in zip(recipe_paths.split(","), out_paths.split(",")):
        config = load_config(json.loads(open(recipe_path).read()))
        torch.manual_seed(0)
        model, results = run_training(config, progress=False)
        if int(os.environ.get("RANK", "0")) == 0:
            digest = hashlib.sha256()
            for key, value in sorted(model.state_dict().items()):
                if hasattr(value, "full_tensor"):
                    continue  # FSDP2 shards: compared through the losses
                digest.update(key.encode())
                digest.update(value.detach().float().contiguous().numpy().tobytes())
            json.dump({"losses": {r.name: r.losses for r in results}, "weights": digest.hexdigest()}, open(out_path, "w"))


if __name__ == "__main__":
    main()
