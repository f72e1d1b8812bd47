"""Small shared helpers: atomic writes, JSONL logging, seeding, quiet third-party loggers."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


# Loggers of optional libraries that transformers imports whenever they are installed (torchao,
# for `serve --quantize int8`): their import-time notices (CUDA kernels a CPU build cannot load,
# a torch deprecation they trigger) say nothing about the user's command.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_third_party_loggers() -> None:
    """Silence `QUIET_LOGGERS` below errors: in the CLI, and in every process it spawns."""
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this (worker) process when the process that started it dies: a
    SIGKILL, the OOM killer or a plain SIGTERM to the parent alone would otherwise leave it running
    with nobody to read its results. Elsewhere a no-op."""
    import signal

    try:
        import ctypes

        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the call
            os._exit(1)
    except (OSError, AttributeError):
        pass


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only swap)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def respect_umask(path: str | Path) -> None:
    """Give a file or folder made by `tempfile` (0600 / 0700, private by design) the mode a plain
    open() or mkdir() would have given it, and do the same for everything inside a folder."""
    mask = current_umask()
    path = Path(path)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode("utf-8"))


class JsonlLogger:
    """Appends one JSON object per line and flushes, so a killed run keeps what it logged."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, default=float) + "\n")
        self._f.flush()

    def drop(self, predicate) -> int:
        """Remove the logged records for which `predicate(record)` is true, and any line a kill
        left half-written; returns how many lines went. A resumed stage drops the steps it is
        about to redo, so readers see one line per step."""
        self._f.close()
        kept, dropped = [], 0
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    dropped += 1
                    continue
                if isinstance(record, dict) and predicate(record):
                    dropped += 1
                else:
                    kept.append(line)
            if dropped:
                atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        self._f = open(self.path, "a", encoding="utf-8")
        return dropped

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_folder(new: Path, target: Path) -> None:
    """Put the finished folder `new` at `target` (same file system) and remove what was there. An
    existing target is swapped out in one step (`renameat2(RENAME_EXCHANGE)`), so at every moment
    `target` is complete, old or new; where the system cannot exchange, two renames a moment apart
    (through `.<target>.old`). A kill before the old content is removed leaves it at `new`."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)
    else:
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
