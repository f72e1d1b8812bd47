"""Checkpoints: safetensors weights + the JSON config + the tokenizer, written atomically.

Only what the config cannot rebuild is saved: the trained parts, and any part that was randomly
initialised. Pretrained frozen parts are reloaded from the files the config names. A part folder
that lives in another checkpoint (an import's `llm/`) is carried: hard-linked (copied across file
systems) into this one and recorded relative to it, so the checkpoint loads after either folder
moves or the import is deleted. Optimizer,
scheduler and RNG state (for resuming) go to `trainer_state.pt`, read back with
`weights_only=True`, so loading a checkpoint never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlmkit.config import PART_FOLDERS, Config, ConfigError, load_config, located_parts, missing_part, missing_part_message
from vlmkit.model.lora import base_state, is_lora_key, load_adapters, merge_adapters, save_adapters, to_module_keys
from vlmkit.model.vlm import VisionLanguageModel, ensure_image_token
from vlmkit.utils import replace_folder, respect_umask

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
META = "meta.json"
TRAINER_STATE = "trainer_state.pt"
TOKENIZER_DIR = "tokenizer"


def parts_to_save(model) -> list[str]:
    # Adapter parameters go to their own file: a part that trains only through them is not saved.
    trainable = [n for n, m in model.parts().items() if any(p.requires_grad and not is_lora_key(k) for k, p in m.named_parameters())]
    random_init = [n for n in model.parts() if n not in model.pretrained_parts]
    return sorted(set(trainable) | set(random_init))


def model_state(model, parts: list[str]) -> dict[str, torch.Tensor]:
    state = {}
    for name in parts:
        for key, value in base_state(model.parts()[name].state_dict()).items():
            if hasattr(value, "full_tensor"):
                # An FSDP2 shard: every rank must take part in gathering it.
                value = value.full_tensor()
            state[f"{name}.{key}"] = value.detach().contiguous().cpu()
    # Tied weights (embeddings = LM head) share storage; safetensors wants each stored once.
    seen: dict[int, str] = {}
    for key in list(state):
        ptr = state[key].untyped_storage().data_ptr()
        if ptr in seen and state[key].numel():
            state[key] = state[key].clone()
        seen[ptr] = key
    return state


def save_checkpoint(directory: str | Path, model, config: Config, meta: dict[str, Any] | None = None, trainer_state: dict | None = None,
                    *, weights: dict[str, torch.Tensor] | None = None, inside: tuple[str, ...] = ()) -> Path:
    """`weights`: the state already gathered (distributed runs gather on every rank, write on one).
    `inside`: part folders the caller puts into the checkpoint itself (`import-hf`'s `llm/`)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        parts = parts_to_save(model)
        save_file(weights if weights is not None else model_state(model, parts), str(tmp / WEIGHTS))
        carried = carry_parts(config, tmp, inside)
        tree = config.model_dump(mode="json")
        for part in [*inside, *carried]:
            tree["model"][part]["path"] = part
        (tmp / CONFIG).write_text(json.dumps(tree, indent=2))
        lora_spec = model.lora_spec
        if lora_spec:
            save_adapters(model, tmp)
        extra = {**({"lora": lora_spec} if lora_spec else {}), **({"carried": carried} if carried else {})}
        (tmp / META).write_text(json.dumps({"parts": parts, **(meta or {}), **extra}, indent=2))
        model.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        # mkdtemp made the folder 0700; a checkpoint is shared like any other output.
        respect_umask(tmp)
        replace_folder(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def in_checkpoint(path: Path) -> bool:
    """Whether the folder `path` lives in a vlmkit checkpoint (an import's `llm/`, or a part
    folder an earlier checkpoint carried)."""
    return path.is_dir() and (path.parent / CONFIG).is_file() and (path.parent / META).is_file()


def carry_parts(config: Config, tmp: Path, inside: tuple[str, ...] = ()) -> dict[str, str]:
    """Put into `tmp` each part folder the config reads from another checkpoint; returns
    {part: the folder it came from}. Hard links cost no disk and stay valid when the source is
    deleted (vlmkit never rewrites a part folder in place: imports swap whole folders); where
    the file system refuses them (another device), the files are copied. A folder of the
    user's own (`llm.path: /models/x`) is named, not copied, as a PEFT adapter names its base."""
    carried = {}
    for part in PART_FOLDERS:
        path = getattr(config.model, part).path
        if part in inside or not path or not in_checkpoint(Path(path).resolve()):
            continue
        source = Path(path).resolve()
        shutil.copytree(source, tmp / part, copy_function=_link_or_copy)
        carried[part] = str(source)
    return carried


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


def read_config(directory: str | Path) -> Config:
    """The checkpoint's config, its part folders made absolute (`config.located_parts`)."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a vlmkit checkpoint (no {CONFIG})")
    tree = json.loads(path.read_text())
    if isinstance(tree.get("model"), dict):
        tree["model"] = located_parts(tree["model"], Path(directory))
    return load_config(tree, init_defaults=False)


def source_config(directory: str | Path) -> Config:
    """The config as the run that wrote the checkpoint had it: carried part folders at the paths
    they were carried from (what a resumed run's own config names)."""
    config = read_config(directory)
    for part, source in read_meta(directory).get("carried", {}).items():
        getattr(config.model, part).path = source
    return config


def check_parts(directory: str | Path, config: Config) -> None:
    """Refuse a checkpoint whose part folder is gone, naming the part, where it was expected and
    what to do, before transformers reports a bare missing file."""
    missing = missing_part(config.model.model_dump(mode="json"))
    if missing:
        raise FileNotFoundError(missing_part_message(f"checkpoint {Path(directory).resolve()}", missing, Path(directory), read_meta(directory)))


def load_weights(model, directory: str | Path, quantize: bool = True) -> dict[str, Any]:
    """Load the saved parts; a checkpoint with LoRA adapters adds them (if the model has none
    yet) and loads them too. `quantize=False` puts QLoRA adapters on the full-precision base."""
    directory = Path(directory)
    meta = json.loads((directory / META).read_text())
    state = load_file(str(directory / WEIGHTS))
    if meta.get("lora"):
        load_adapters(model, directory, meta["lora"], quantize=quantize)
    for name in meta["parts"]:
        prefix = f"{name}."
        module = model.parts()[name]
        sub = to_module_keys(module, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        missing, unexpected = module.load_state_dict(sub, strict=False)
        missing = [k for k in missing if not is_lora_key(k)]
        # Tied LM heads are saved under both names; a missing key is a real mismatch.
        if missing or unexpected:
            raise ValueError(f"checkpoint {directory}: part {name!r} does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return meta


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    return json.loads(path.read_text()) if path.is_file() else {}


def _load_saved_tokenizer(model, directory: Path, image_token: str) -> None:
    tok_dir = directory / TOKENIZER_DIR
    if tok_dir.is_dir():
        from transformers import AutoTokenizer

        model.tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        # The saved tokenizer decides the placeholder's id, not the one the build made.
        model.image_token_id = ensure_image_token(model.tokenizer, image_token)
        video_token = getattr(model.config, "video_token", None)
        if video_token:
            model.video_token_id = ensure_image_token(model.tokenizer, video_token)


def load_checkpoint(directory: str | Path, device: str = "cpu", merge: bool = True):
    """Rebuild the model from the checkpoint's config and load its saved parts. `merge=False`
    keeps LoRA adapters as separate layers (`export-hf --adapters peft`)."""
    config = read_config(directory)
    check_parts(directory, config)
    model = VisionLanguageModel.build(config.model)
    _load_saved_tokenizer(model, Path(directory), config.model.image_token)
    # QLoRA's 4-bit base is a training device: inference puts the adapters on the full-precision base.
    load_weights(model, directory, quantize=False)
    # Inference (eval, serve, chat, export) runs on merged weights: W + B A * alpha / r.
    if merge:
        merge_adapters(model)
    model.to(device).eval()
    return model, config


def init_from_checkpoint(model, directory: str | Path) -> None:
    """Load another run's checkpoint into a freshly built model (`model.init_from`), to fine-tune it."""
    directory = Path(directory)
    if not (directory / META).is_file() or not (directory / WEIGHTS).is_file():
        raise ConfigError(f"model.init_from: {directory.resolve()} is not a vlmkit checkpoint (no {META} / {WEIGHTS})")
    _load_saved_tokenizer(model, directory, model.config.image_token)
    try:
        meta = load_weights(model, directory)
    except (ValueError, RuntimeError) as e:  # torch reports a shape mismatch as a RuntimeError
        # The recipe's model section changed the architecture the checkpoint was saved from.
        lines = [line.strip() for line in str(e).splitlines()]
        first = next((line for line in lines if line.startswith("size mismatch")), lines[0])
        raise ConfigError(f"model.init_from: the checkpoint's weights do not fit the model this recipe builds ({first}); "
                          "keep the checkpoint's model settings (or leave them out of the recipe)") from None
    # These parts no longer hold what the config's pretrained files hold, so every checkpoint of
    # this run saves them: it stays loadable without the folder it started from.
    model.pretrained_parts -= set(meta["parts"])


def load_trainer_state(directory: str | Path) -> dict | None:
    path = Path(directory) / TRAINER_STATE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- periodic checkpoints: rotation and resume -----------------------------------------------

def rotate_and_save(stage_dir: Path, step: int, keep: int, save) -> Path:
    """Write the periodic checkpoint of `step` as `<stage>-last`, keeping the `keep` newest.

    The previous `-last` is renamed to `<stage>-step-N` (a rename, not a copy) before the new one
    is swapped in; `save(path)` writes atomically. A kill at any moment leaves at least one
    complete checkpoint that `latest_resumable` finds.
    """
    last = stage_dir.with_name(f"{stage_dir.name}-last")
    # Half-written folders a kill left behind: never read, only in the way.
    for pattern in (f".{stage_dir.name}-last.tmp-*", f".{stage_dir.name}-*.pruned", f".{stage_dir.name}-last.old"):
        for stale in stage_dir.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    # A step folder without trainer state is what a kill during pruning leaves (rmtree is not
    # atomic); it can never be resumed from.
    for _, path in _step_dirs(stage_dir, complete=False):
        if not (path / TRAINER_STATE).is_file():
            _prune(path)
    if (last / META).is_file():
        old_step = int(json.loads((last / META).read_text()).get("step", 0))
        os.replace(last, stage_dir.with_name(f"{stage_dir.name}-step-{old_step:08d}"))
    save(last)
    older = sorted(_step_dirs(stage_dir), reverse=True)
    for _, path in older[max(0, keep - 1):]:
        _prune(path)
    return last


def _prune(path: Path) -> None:
    """Delete a checkpoint folder: first renamed out of the `-step-N` namespace (atomic), so a kill
    mid-delete leaves a hidden `.pruned` folder that the next rotation removes."""
    trash = path.with_name(f".{path.name}.pruned")
    shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def _step_dirs(stage_dir: Path, complete: bool = True) -> list[tuple[int, Path]]:
    """`<stage>-step-N` folders; with `complete`, only those holding trainer state."""
    pattern = re.compile(re.escape(stage_dir.name) + r"-step-(\d+)$")
    found = []
    if stage_dir.parent.is_dir():
        for path in stage_dir.parent.iterdir():
            m = pattern.match(path.name)
            if m and path.is_dir() and (not complete or (path / TRAINER_STATE).is_file()):
                found.append((int(m.group(1)), path))
    return found


def latest_resumable(stage_dir: Path) -> Path | None:
    """The newest complete periodic checkpoint of a stage (`-last`, else the newest `-step-N`)."""
    last = stage_dir.with_name(f"{stage_dir.name}-last")
    if (last / TRAINER_STATE).is_file() and (last / META).is_file():
        return last
    older = sorted(_step_dirs(stage_dir), reverse=True)
    return older[0][1] if older else None


def remove_periodic(stage_dir: Path) -> None:
    shutil.rmtree(stage_dir.with_name(f"{stage_dir.name}-last"), ignore_errors=True)
    for _, path in _step_dirs(stage_dir, complete=False):
        _prune(path)


class ResumeMismatchError(ValueError):
    """A checkpoint written under a different config than the run trying to resume from it."""


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config trees."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        where = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(config_differences(a, b, where + "."))
        elif a != b:
            diffs.append(f"{where}: checkpoint {a!r}, now {b!r}")
    return diffs


def rng_state() -> dict[str, Any]:
    """Every RNG a step can draw from, in tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value
