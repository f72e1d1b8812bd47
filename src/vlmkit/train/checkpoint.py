"""Checkpoints: safetensors weights + the JSON config + the tokenizer, written atomically.

Only what the config cannot rebuild is saved: the trained parts, and any part that was randomly
initialised. Pretrained frozen parts are reloaded from the files the config names. Optimizer,
scheduler and RNG state (for resuming) go to `trainer_state.pt`, read back with
`weights_only=True`, so loading a checkpoint never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlmkit.config import Config, load_config

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
META = "meta.json"
TRAINER_STATE = "trainer_state.pt"
TOKENIZER_DIR = "tokenizer"


def parts_to_save(model) -> list[str]:
    trainable = [n for n, m in model.parts().items() if any(p.requires_grad for p in m.parameters())]
    random_init = [n for n in model.parts() if n not in model.pretrained_parts]
    return sorted(set(trainable) | set(random_init))


def model_state(model, parts: list[str]) -> dict[str, torch.Tensor]:
    state = {}
    for name in parts:
        for key, value in model.parts()[name].state_dict().items():
            state[f"{name}.{key}"] = value.detach().contiguous().cpu()
    # Tied weights (embeddings = LM head) share storage; safetensors wants each stored once.
    seen: dict[int, str] = {}
    for key in list(state):
        ptr = state[key].untyped_storage().data_ptr()
        if ptr in seen and state[key].numel():
            state[key] = state[key].clone()
        seen[ptr] = key
    return state


def save_checkpoint(directory: str | Path, model, config: Config, meta: dict[str, Any] | None = None, trainer_state: dict | None = None) -> Path:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        parts = parts_to_save(model)
        save_file(model_state(model, parts), str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(config.model_dump(mode="json"), indent=2))
        (tmp / META).write_text(json.dumps({"parts": parts, **(meta or {})}, indent=2))
        model.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _replace_dir(new: Path, target: Path) -> None:
    """Swap `new` into place; at every moment either the old or the new checkpoint is complete."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def read_config(directory: str | Path) -> Config:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a vlmkit checkpoint (no {CONFIG})")
    return load_config(json.loads(path.read_text()))


def load_weights(model, directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    meta = json.loads((directory / META).read_text())
    state = load_file(str(directory / WEIGHTS))
    for name in meta["parts"]:
        prefix = f"{name}."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = model.parts()[name].load_state_dict(sub, strict=False)
        # Tied LM heads are saved under both names; a missing key is a real mismatch.
        if missing or unexpected:
            raise ValueError(f"checkpoint {directory}: part {name!r} does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return meta


def load_checkpoint(directory: str | Path, device: str = "cpu"):
    """Rebuild the model from the checkpoint's config and load its saved parts."""
    from vlmkit.model.vlm import VisionLanguageModel

    config = read_config(directory)
    model = VisionLanguageModel.build(config.model)
    tok_dir = Path(directory) / TOKENIZER_DIR
    if tok_dir.is_dir():
        from transformers import AutoTokenizer

        model.tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    load_weights(model, directory)
    model.to(device).eval()
    return model, config


def load_trainer_state(directory: str | Path) -> dict | None:
    path = Path(directory) / TRAINER_STATE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
