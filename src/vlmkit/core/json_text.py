"""JSON files a user hands in, parsed so that every way they can be wrong names the file."""

from __future__ import annotations

import json
from typing import Any


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # `json` keeps the last of two equal keys; in a file keyed by id that silently drops an item.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def parse_json_bytes(raw: bytes, where: str, error: type[Exception] = ValueError, *, unique_keys: bool = False) -> Any:
    """The JSON document in `raw`, read from `where` (a path, or a path and line). A binary file,
    text that is not UTF-8 or not JSON, nesting past Python's recursion limit and, with
    `unique_keys`, a key given twice in one object each raise `error` with `where` in front."""
    if b"\x00" in raw[:4096]:
        raise error(f"{where}: a binary file, not JSON text")
    try:
        return json.loads(raw.decode("utf-8-sig"), object_pairs_hook=_unique_keys if unique_keys else None)
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte {e.start} is {raw[e.start:e.start + 1]!r})") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply to read") from None
    except _DuplicateKey as e:
        raise error(f"{where}: key {e.args[0]!r} appears twice in one object") from None
