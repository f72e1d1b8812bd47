"""Training-data formats, read into typed samples.

LLaVA JSON: a list of `{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}`
records; `image` may be a path (relative to the image folder) or a list of paths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadRecordError(ValueError):
    """A training or evaluation record that cannot be used; the message names it."""

    def __init__(self, record_id: str, reason: str, source: str | None = None):
        where = f"{source}: " if source else ""
        super().__init__(f"{where}record {record_id!r}: {reason}")
        self.record_id = record_id
        self.reason = reason


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class Sample:
    id: str
    messages: list[Message]
    images: list[Path] = field(default_factory=list)


def read_llava_json(path: str | Path, image_folder: str | Path | None = None) -> list[Sample]:
    """Read a LLaVA-format JSON (or JSONL) file; image paths resolve against `image_folder`
    (default: the file's own folder)."""
    path = Path(path)
    root = Path(image_folder) if image_folder else path.parent
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path}") from None
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return [llava_record_to_sample(r, i, root, str(path)) for i, r in enumerate(records)]


def llava_record_to_sample(record: dict, index: int, image_root: Path, source: str = "") -> Sample:
    rid = str(record.get("id", f"#{index}")) if isinstance(record, dict) else f"#{index}"
    if not isinstance(record, dict):
        raise BadRecordError(rid, "record is not an object", source)
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRecordError(rid, "missing or empty 'conversations'", source)
    messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadRecordError(rid, f"conversation turn {t} needs 'from' and 'value'", source)
        role = ROLE_NAMES.get(turn["from"])
        if role is None:
            raise BadRecordError(rid, f"conversation turn {t} has unknown speaker {turn['from']!r}", source)
        messages.append(Message(role, str(turn["value"])))
    image = record.get("image")
    images = [] if image is None else [image] if isinstance(image, str) else list(image)
    return Sample(id=rid, messages=messages, images=[image_root / p for p in images])


def write_llava_json(path: str | Path, records: list[dict]) -> None:
    from vlmkit.utils import atomic_write_text

    atomic_write_text(Path(path), json.dumps(records, indent=1, ensure_ascii=False))
