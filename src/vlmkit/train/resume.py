"""When a stage is resumed, reused or refused.

A stage's final checkpoint (`checkpoints/<stage>`) and its periodic ones (`<stage>-last`,
`<stage>-step-N`) record the settings, the data's digest and the earlier stage they were trained
under. A run reuses a finished stage only when all three are unchanged, and resumes from a periodic
checkpoint only under the same conditions; otherwise it refuses, naming what changed, or (on
request) trains the stage again or on from its trained weights.
"""

from __future__ import annotations

from pathlib import Path

from vlmkit import checkpoint as ckpt
from vlmkit.config import Config
from vlmkit.train import distributed as D

# Keys of `train` that change what a stage computes; the rest (paths, logging, device) may differ.
TRAJECTORY_KEYS = ("seed", "max_length", "precision", "on_bad_record", "cache_frozen_vision", "distributed")


def _resume_view(tree: dict, stage: str) -> dict:
    train = tree.get("train", {})
    settings = dict(train.get("stages", {}).get(stage) or {})
    # The data is compared by its contents (the digest in meta.json), not by where the file lies.
    settings.pop("data", None)
    return {"model": tree.get("model", {}),
            "train": {**{k: train.get(k) for k in TRAJECTORY_KEYS}, "stages": {stage: settings}}}


def stage_differences(directory: Path, config: Config, stage: str, data_sha256: str | None = None,
                      after: str | None = None) -> list[str]:
    """What differs between the run a stage checkpoint was written by and this one: dotted config
    keys, the data file's contents, and the earlier stage it was trained on top of."""
    # Re-validated, so keys added since the checkpoint was written compare as their defaults; part
    # folders it carries compare as the paths the run read them from.
    saved = ckpt.source_config(directory)
    diffs = ckpt.config_differences(_resume_view(saved.model_dump(mode="json"), stage),
                                    _resume_view(config.model_dump(mode="json"), stage))
    meta = ckpt.read_meta(directory)
    if data_sha256 and meta.get("data_sha256") not in (None, data_sha256):
        before = saved.train.stages[stage].data if stage in saved.train.stages else "?"
        diffs.append(f"train.stages.{stage}.data: not the data the checkpoint was trained on "
                     f"(checkpoint {before}, now {config.train.stages[stage].data}, contents differ)")
    if "after" in meta and meta["after"] != after:
        diffs.append("an earlier stage was trained again since this stage was trained on top of it")
    return diffs


def mismatch_error(stage: str, directory: Path, diffs: list[str], finished: bool) -> ckpt.ResumeMismatchError:
    if finished:
        what, hint = "is already trained", (
            "To train it again from the start under the new settings, add --restart; to continue from its "
            "trained weights, add --extend (either way, the stages after it are trained again).")
    else:
        what, hint = "has a checkpoint to resume from", "To discard that checkpoint and start the stage over, add --restart."
    return ckpt.ResumeMismatchError(
        f"stage {stage!r} {what} in {directory}, under different settings:\n  " + "\n  ".join(diffs[:20])
        + f"\n{hint} Or use the original settings, or a new train.output_dir."
    )


def check_extendable(name: str, diffs: list[str]) -> None:
    model_changed = [d for d in diffs if d.startswith("model.")]
    if model_changed:
        raise ckpt.ResumeMismatchError(
            f"stage {name!r}: --extend continues from the trained weights, which need the same model; "
            "these model settings changed:\n  " + "\n  ".join(model_changed) + "\nUse --restart to train it again.")


def finished_stage(done: Path, config: Config, name: str, data_sha256: str | None, after: str | None,
                   on_change: str) -> tuple[str, list[str]]:
    """What a run does with stage `name`, whose final checkpoint would be `done`, and what changed:
    "train" (no final checkpoint), "load" (trained under the same settings, data and earlier
    stages), else per `on_change`: a ResumeMismatchError ("refuse"), "restart" or "extend". A stage
    whose earlier stage was trained again restarts even under "extend": its weights were fitted to
    the old one."""
    if not (done / ckpt.META).is_file():
        return "train", []
    diffs = stage_differences(done, config, name, data_sha256, after)
    if not diffs:
        return "load", []
    if on_change == "refuse":
        raise mismatch_error(name, done, diffs, finished=True)
    if on_change == "extend":
        check_extendable(name, diffs)
    extend = on_change == "extend" and not any(d.startswith("an earlier") for d in diffs)
    return ("extend" if extend else "restart"), diffs


def check_changed_stages(config: Config, data: dict, on_change: str) -> None:
    """The refusals the stage loop would make for finished stages, made from their checkpoints
    alone, so they come before the model is built."""
    previous = None
    for name in config.train.stages:
        done = Path(config.train.output_dir) / "checkpoints" / name
        if finished_stage(done, config, name, data[name].sha256, previous, on_change)[0] != "load":
            return  # this stage trains, and so do the ones after it
        previous = ckpt.read_meta(done).get("id")


def resumable_checkpoint(stage_dir: Path, config: Config, name: str, dist: D.DistContext, data_sha256: str | None,
                         after: str | None, discard_mismatched: bool) -> Path | None:
    """The periodic checkpoint to resume stage `name` from, if any. One written under other
    settings is refused, or with `discard_mismatched` deleted (and the stage starts over)."""
    resume_dir = ckpt.latest_resumable(stage_dir)
    if resume_dir is None:
        return None
    diffs = stage_differences(resume_dir, config, name, data_sha256, after)
    if not diffs:
        return resume_dir
    if not discard_mismatched:
        raise mismatch_error(name, resume_dir, diffs, finished=False)
    if dist.is_main:
        print(f"[vlmkit] stage {name}: discarding {resume_dir.name} (written under other settings)")
        ckpt.remove_periodic(stage_dir)
    dist.barrier()
    return None


def load_weights(model, directory: Path) -> None:
    """Load a checkpoint's weights into the model, sharded (FSDP2) or not."""
    # torch.distributed's FSDP and state-dict modules are heavy to import; only resuming needs them.
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        ckpt.load_weights(model, directory)
        return
    # A sharded model takes whole tensors through the distributed state-dict API.
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
    )

    set_model_state_dict(model, load_file(str(directory / ckpt.WEIGHTS)), options=StateDictOptions(full_state_dict=True, strict=False))
