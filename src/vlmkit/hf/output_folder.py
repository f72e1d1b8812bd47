"""Writing a whole output folder (`import-hf`, `export-hf`) without ever losing what was there.

Rules, checked before any work starts and again at the moment the folder is swapped in:

* OUT may not be the source, contain the source, or contain the current working folder;
* an existing OUT is replaced only when it is empty, or when it carries the marker of an earlier
  output of the same command (`vlmkit-output.json`), or when the caller asked to overwrite it
  (`--overwrite`), and then only that very folder (by device and inode), not one that took its
  place meanwhile;
* the new folder is built beside OUT (same file system) and swapped in atomically with
  `renameat2(RENAME_EXCHANGE)`, so at every moment OUT holds either the complete old output or the
  complete new one; where the kernel or file system cannot exchange, two renames a moment apart
  (`utils.replace_folder`, which training checkpoints use too);
* staging folders carry the writer's pid; those of processes that are gone (killed mid-way) are
  removed by the next run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from vlmkit.utils import current_umask, replace_folder

MARKER = "vlmkit-output.json"
# Outputs of earlier vlmkit versions, recognised as our own: an imported checkpoint's meta names
# the folder it came from; a LLaVA export carried this file.
_LEGACY_MARKERS = {"import-hf": ("meta.json", "imported_from"), "export-hf": ("vlmkit_export.json", None)}
_STAGING = "vlmkit-staging"


class OutputFolderError(ValueError):
    """OUT cannot be written without losing something; the message says what and how to proceed."""


# Folders the caller approved for replacement (--overwrite), by identity, for this process.
_approved: set[tuple[int, int]] = set()


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _is_ours(folder: Path, command: str) -> bool:
    marker = folder / MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text()).get("command") == command
        except (ValueError, OSError, AttributeError):
            return False
    legacy, key = _LEGACY_MARKERS.get(command, (None, None))
    if legacy and (folder / legacy).is_file():
        if key is None:
            return True
        try:
            return key in json.loads((folder / legacy).read_text())
        except (ValueError, OSError, TypeError):
            return False
    return False


def _refusal(out: Path, command: str) -> str | None:
    """Why OUT, as it is now, may not be replaced without --overwrite (None: it may)."""
    if not out.exists() and not out.is_symlink():
        return None
    if out.is_symlink() or not out.is_dir():
        return f"{out} exists and is not a folder"
    if not any(out.iterdir()) or _is_ours(out, command):
        return None
    return f"{out} is not empty and was not written by `vlmkit {command}`"


def claim_output(out: str | Path, *, command: str, sources: tuple[str | Path, ...] = (), overwrite: bool = False) -> Path:
    """Check that `command` may write OUT; returns it resolved. Raises OutputFolderError naming
    the conflict. Leftover staging folders of killed runs beside OUT are removed."""
    out = Path(out).expanduser().resolve()
    for source in sources:
        source = Path(source).expanduser().resolve()
        if _within(source, out):
            what = "is" if source == out else "contains"
            raise OutputFolderError(f"{out} {what} the source {source}: write the output to another folder")
    cwd = Path.cwd().resolve()
    if _within(cwd, out):
        raise OutputFolderError(f"{out} is or contains the current folder: write the output to a new folder")
    if out.exists() and not out.is_dir():  # a file is never replaced, --overwrite or not
        raise OutputFolderError(f"{out} exists and is not a folder")
    reason = _refusal(out, command)
    if reason:
        if not overwrite:
            raise OutputFolderError(f"{reason}; refusing to replace it (name a new or empty folder, or pass --overwrite "
                                    f"to replace everything in it)")
        _approved.add(_identity(out))
    remove_stale_staging(out)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove staging folders beside OUT left by runs that were killed (their pid is gone), and the
    `.OUT.import-*` / `.OUT.tmp-*` / `.OUT.peft-*` folders earlier versions left the same way."""
    if not out.parent.is_dir():
        return []
    ours = re.compile(rf"^\.{re.escape(out.name)}\.{_STAGING}-(\d+)-[A-Za-z0-9_]+$")
    legacy = re.compile(rf"^\.{re.escape(out.name)}\.(import|tmp|peft)-[a-z0-9_]{{8}}$")
    removed = []
    for entry in out.parent.iterdir():
        if not entry.is_dir() or entry.is_symlink():
            continue
        m = ours.match(entry.name)
        # `.OUT.old`: the old output of a swap made by two renames (`replace_folder`), once OUT is whole again.
        swapped_out = entry.name == f".{out.name}.old" and out.is_dir()
        if (m and not _pid_alive(int(m.group(1)))) or legacy.match(entry.name) or swapped_out:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def staging_folder(out: str | Path) -> Path:
    """An empty folder beside OUT to build the new output in (same file system, so the swap is a rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{_STAGING}-{os.getpid()}-", dir=out.parent))


def publish(new: Path, out: str | Path, *, command: str, source: str | Path | None = None) -> Path:
    """Put the finished folder `new` at OUT with the command's marker. An existing OUT is checked
    again (empty, ours, or approved by --overwrite), then swapped out in one step and removed."""
    new, out = Path(new), Path(out)
    (new / MARKER).write_text(json.dumps({"command": command, **({"source": str(source)} if source else {})}, indent=2) + "\n")
    os.chmod(new / MARKER, 0o666 & ~current_umask())
    reason = _refusal(out, command)
    if reason and _identity(out) not in _approved:
        raise OutputFolderError(f"{reason}; refusing to replace it (it changed while the output was written)")
    replace_folder(new, out)
    _approved.discard(_identity(out))
    return out
