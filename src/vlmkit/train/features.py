"""Frozen vision-tower features, computed per micro-batch and optionally kept on disk.

While the tower is frozen its output for an image cannot change, so features are worth keeping:
not in memory (that grows with the dataset) but in a folder of safetensors files, one per image,
named by a digest of the tower's weights and the image's preprocessed pixels (so the key covers
the image content, every preprocessing setting and the tower itself; a later stage or run with
the same frozen tower reuses them). Files are written to a temporary name and renamed, so a
killed run never leaves a torn file under a real name.

Each file also records what it was computed from (the tower digest and the image key) and the
shape of every view, in its safetensors header. A file is used only when that record matches
the image asked for, its tensors have the recorded shapes and dtype, and every value is finite;
anything else (a torn or hand-edited file, files swapped or copied between names, NaN, files
written by an older vlmkit without the record) is reported, recomputed and rewritten.

The cache is optional: when it cannot be written (disk full, read-only, permissions) training
goes on without storing, after one warning naming the folder. Once the folder holds
`max_bytes`, new features are computed but no longer stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from vlmkit.train import distributed as D


# Written into every file's header; a file without it (or with another) is recomputed, not misread.
FORMAT = "vlmkit-frozen-features/2"
# Bad entries reported by name, per run; later ones are only counted (`feature_cache_corrupt`).
MAX_REPORTS = 10


class BadEntry(Exception):
    """A cache file that must not be used; the message says why."""


def _write_atomic(path: Path, data: bytes) -> None:
    """Temporary name, then rename: a killed run or a full disk never leaves a torn file under
    a real name. No fsync: a file torn by a power cut fails its checks and is recomputed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tower_digest(model) -> str:
    """Digest of the vision tower's weights and of what is read from it (the feature layer)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(model.vision).__name__.encode())
    h.update(repr(model.config.vision.feature_layer).encode())
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
        self.writable = True
        self._reports = 0
        if self.dir:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                print(f"[vlmkit] warning: feature cache {self.dir} cannot be created ({e}); training goes on without it")
                self.dir = None
                return
            # What the folder already holds counts against the bound (one scan, at the start).
            for root, _, files in os.walk(self.dir):
                for f in files:
                    if f.endswith(".safetensors"):
                        try:
                            self.size += os.path.getsize(os.path.join(root, f))
                        except OSError:
                            pass  # removed meanwhile

    def _path(self, key: str) -> Path:
        name = hashlib.blake2b((self.tower + key).encode(), digest_size=20).hexdigest()
        return self.dir / name[:2] / f"{name}.safetensors"

    def _report(self, message: str) -> None:
        self._reports += 1
        if self._reports <= MAX_REPORTS:
            print(f"[vlmkit] feature cache: {message}")
        elif self._reports == MAX_REPORTS + 1:
            print(f"[vlmkit] feature cache: further bad entries in {self.dir} are recomputed without a message "
                  "(counted in feature_cache_corrupt)")

    def _load(self, path: Path, key: str, image) -> list[torch.Tensor] | None:
        """The entry's views, or None when there is none or it must not be used (reported)."""
        if not path.is_file():
            return None
        try:
            return self._read_checked(path, key, image)
        except BadEntry as e:
            why = str(e)
        except Exception as e:  # noqa: BLE001  (anything a damaged file can raise: it is recomputed)
            why = f"does not read back ({type(e).__name__}: {e})"
        self.corrupt += 1
        self._report(f"{path} {why}; recomputing it")
        return None

    def _read_checked(self, path: Path, key: str, image) -> list[torch.Tensor]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise BadEntry(f"has no {FORMAT} record (written by an older vlmkit, or not by vlmkit)")
            if meta.get("tower") != self.tower or meta.get("key") != key:
                raise BadEntry(f"was computed for another image or tower (key {meta.get('key')!r}, expected {key!r})")
            shapes = [tuple(s) for s in json.loads(meta.get("shapes", "null"))]
            names = [f"view{i}" for i in range(len(shapes))]
            if sorted(f.keys()) != sorted(names):
                raise BadEntry(f"holds tensors {sorted(f.keys())}, its record says {names}")
            # The tower makes one feature tensor per view of the image; the key covers the views,
            # so a count that differs means a file made up under this name.
            whole = self.model.vision.encodes_whole_images
            n_views = len(getattr(image, "views", None) or ())
            if not whole and n_views and n_views != len(shapes):
                raise BadEntry(f"holds {len(shapes)} view(s) for an image of {n_views}")
            for name, shape in zip(names, shapes):
                got = tuple(f.get_slice(name).get_shape())
                if got != shape:  # checked from the header, before any data is read
                    raise BadEntry(f"{name} has shape {list(got)}, its record says {list(shape)}")
            views = [f.get_tensor(name) for name in names]
        for name, v in zip(names, views):
            if v.dtype != torch.float32:
                raise BadEntry(f"{name} is {v.dtype}, expected float32")
            if not torch.isfinite(v).all():
                raise BadEntry(f"{name} holds NaN or infinite values")
        return views

    def _store(self, path: Path, key: str, views: list[torch.Tensor]) -> None:
        from safetensors.torch import save

        if not self.writable:
            return
        if not all(bool(torch.isfinite(v).all()) for v in views):
            return  # never keep what a later run would refuse to read
        need = sum(v.numel() * v.element_size() for v in views) + 512
        if self.max_bytes and self.size + need > self.max_bytes:
            self.not_stored += 1
            return
        meta = {"format": FORMAT, "tower": self.tower, "key": key,
                "shapes": json.dumps([list(v.shape) for v in views])}
        data = save({f"view{i}": v.contiguous() for i, v in enumerate(views)}, metadata=meta)
        try:
            old = path.stat().st_size if path.exists() else 0  # a bad entry being replaced
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, data)
        except OSError as e:
            # The cache only saves time: a full disk (or a folder turned read-only) must not stop
            # training. Entries already there are still read.
            self.writable = False
            self.not_stored += 1
            print(f"[vlmkit] warning: feature cache {self.dir} cannot be written ({e}); "
                  "training goes on without storing features")
            return
        self.size += len(data) - old

    @torch.no_grad()
    def features(self, batch, keys: list[str] | None) -> list[list[torch.Tensor]]:
        images = batch.images
        out: list[list[torch.Tensor] | None] = [None] * len(images)
        if self.dir is not None and keys is not None:
            for i, key in enumerate(keys):
                views = self._load(self._path(key), key, images[i])
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
                    self._store(self._path(keys[i]), keys[i], [v.detach().cpu() for v in views])
        return out

    def stats(self) -> dict:
        return {"feature_cache_hits": self.hits, "feature_cache_misses": self.misses, "feature_cache_corrupt": self.corrupt,
                "feature_cache_not_stored": self.not_stored, "feature_cache_bytes": self.size}
