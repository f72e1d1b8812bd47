"""Frozen vision-tower features, computed per micro-batch and optionally kept on disk.

While the tower is frozen its output for an image cannot change, so features are worth keeping:
not in memory (that grows with the dataset) but in a folder of safetensors files, one per image,
named by a digest of the tower's weights and the image's preprocessed pixels (so the key covers
the image content, every preprocessing setting and the tower itself; a later stage or run with
the same frozen tower reuses them). Files are written to a temporary name and renamed, so a
killed run never leaves a torn file under a real name; a file that does not read back (disk
fault, manual damage) is reported, recomputed and rewritten. Once the folder holds `max_bytes`,
new features are computed but no longer stored.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from vlmkit.train import distributed as D


def tower_digest(model) -> str:
    """Digest of the vision tower's weights and of what is read from it (the feature layer)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(model.vision).__name__.encode())
    h.update(repr(getattr(model.config.vision, "feature_layer", None) if hasattr(model, "config") else None).encode())
    with D.unsharded(model):
        for name, t in sorted(model.vision.state_dict().items()):
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            h.update(name.encode())
            h.update(repr((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class FrozenFeatures:
    """`features(batch, keys)`: per image of the batch, its per-view tower features."""

    # Images per tower call: on a CPU a depthwise-conv tower runs slower per image at 32 than at 8
    # (EfficientNet-Lite0 at 256 px, bf16: 23.6 against 10.8 ms).
    CHUNK = 8

    def __init__(self, model, cache_dir: Path | None = None, max_bytes: int = 0, tower: str | None = None, bf16: bool = False):
        """`bf16`: run the tower under bf16 autocast, as the training forward would (`train.precision:
        bf16`); such features are keyed apart from fp32 ones."""
        self.model = model
        self.dir = Path(cache_dir) if cache_dir else None
        self.max_bytes = max_bytes
        self.bf16 = bf16
        self.tower = (tower or (tower_digest(model) if self.dir else "")) + ("/bf16" if bf16 else "")
        self.hits = self.misses = self.corrupt = self.not_stored = 0
        self.size = 0
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)
            # What the folder already holds counts against the bound (one scan, at the start).
            for root, _, files in os.walk(self.dir):
                self.size += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith(".safetensors"))

    def _path(self, key: str) -> Path:
        name = hashlib.blake2b((self.tower + key).encode(), digest_size=20).hexdigest()
        return self.dir / name[:2] / f"{name}.safetensors"

    def _load(self, path: Path) -> list[torch.Tensor] | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            views = [tensors[f"view{i}"] for i in range(len(tensors))]
        except (SafetensorError, KeyError, OSError, ValueError, RuntimeError):
            self.corrupt += 1
            print(f"[vlmkit] feature cache: {path} does not read back; recomputing it")
            return None
        return views

    def _store(self, path: Path, views: list[torch.Tensor]) -> None:
        from safetensors.torch import save_file

        need = sum(v.numel() * v.element_size() for v in views) + 256
        if self.max_bytes and self.size + need > self.max_bytes:
            self.not_stored += 1
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({f"view{i}": v.contiguous() for i, v in enumerate(views)}, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.size += path.stat().st_size

    @torch.no_grad()
    def features(self, batch, keys: list[str] | None) -> list[list[torch.Tensor]]:
        images = batch.images
        out: list[list[torch.Tensor] | None] = [None] * len(images)
        if self.dir is not None and keys is not None:
            for i, key in enumerate(keys):
                views = self._load(self._path(key))
                if views is not None:
                    out[i] = [v.to(self.model.device) for v in views]
                    self.hits += 1
        todo = [i for i in range(len(images)) if out[i] is None]
        if todo:
            computed = []
            autocast = torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.bf16)
            with D.unsharded(self.model), autocast:
                for start in range(0, len(todo), self.CHUNK):
                    chunk = self.model.view_features([images[i] for i in todo[start:start + self.CHUNK]])
                    computed += [[v.float() for v in views] for views in chunk]
            for i, views in zip(todo, computed):
                out[i] = views
                if self.dir is not None and keys is not None:
                    self.misses += 1
                    self._store(self._path(keys[i]), [v.detach().cpu() for v in views])
        return out

    def stats(self) -> dict:
        return {"feature_cache_hits": self.hits, "feature_cache_misses": self.misses, "feature_cache_corrupt": self.corrupt,
                "feature_cache_not_stored": self.not_stored, "feature_cache_bytes": self.size}
