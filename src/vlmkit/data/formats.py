"""Training-data formats, read into typed samples.

Two record styles, told apart per record:

* LLaVA / mix665k: `{"id", "image", "video", "conversations": [{"from": "human"|"gpt", "value"}]}`;
  `image` / `video` is a path (relative to the data folder) or a list of paths; the text places
  them with `<image>` / `<video>` placeholders, in order, or with `<image_k>` / `<video_k>`
  (1-based) to name one explicitly.
* OpenAI / TRL content parts: `{"id", "messages": [{"role", "content"}], "images", "videos"}`
  where `content` is a string or a list of parts: `{"type": "text", "text"}`,
  `{"type": "image"}` (the record's next entry of `images`), `{"type": "image", "image": PATH}`,
  `{"type": "image_url", "image_url": {"url": PATH | file://PATH | data:image/...;base64,...}}`,
  `{"type": "video"}` / `{"type": "video", "video": PATH}`. Each part becomes a placeholder at its
  place in the text, so both styles reach the processor as the same `Sample`.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from vlmkit.core.types import BadRecordError, Message, Sample  # noqa: F401  (the record types, re-exported)
from vlmkit.processing.prompt import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from vlmkit.utils import atomic_write_text

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read_json_records(path: Path, what: str = "data", lenient: bool = False) -> list:
    """The records of a JSON list file or a JSONL file; bad JSON names the file (and line).

    `lenient`: a JSONL line that is not JSON becomes a `BadRecordError` in the list (so a caller
    that skips bad records can skip it) instead of stopping the read."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except (json.JSONDecodeError, RecursionError, ValueError) as e:
                    if lenient:
                        records.append(BadRecordError(f"line {lineno}", f"not valid JSON ({type(e).__name__})", str(path)))
                        continue
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
        return records
    try:
        records = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise ValueError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of {what} records")
    return records


def read_llava_json(path: str | Path, image_folder: str | Path | None = None) -> list[Sample]:
    """Read a LLaVA-format JSON (or JSONL) file; image paths resolve against `image_folder`
    (default: the file's own folder)."""
    path = Path(path)
    root = Path(image_folder) if image_folder else path.parent
    records = read_json_records(path, "data")
    return [record_to_sample(r, i, root, str(path)) for i, r in enumerate(records)]


def read_llava_records(path: str | Path, image_folder: str | Path | None = None) -> list[Sample | BadRecordError]:
    """Like `read_llava_json`, but each record that cannot be read is its `BadRecordError` in the
    list (the caller decides whether a bad record stops the run or is skipped)."""
    path = Path(path)
    root = Path(image_folder) if image_folder else path.parent
    return parse_each(read_json_records(path, "data", lenient=True), record_to_sample, root, str(path))


def parse_each(records: list, parse, root: Path, source: str) -> list:
    """`parse(record, index, root, source)` for every record; a record that could not be read, or
    whose parse raises BadRecordError, stands in the list as that error."""
    out = []
    for i, record in enumerate(records):
        if isinstance(record, BadRecordError):
            out.append(record)
            continue
        try:
            out.append(parse(record, i, root, source))
        except BadRecordError as e:
            out.append(e)
    return out


def record_id(record, index: int) -> str:
    """A record's id as messages name it: its `id` when that is a short string or number, else `#index`."""
    rid = record.get("id") if isinstance(record, dict) else None
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or (isinstance(rid, str) and not rid.strip()):
        return f"#{index}"
    rid = str(rid)
    return rid if len(rid) <= 200 else rid[:200] + "..."


def check_text(rid: str, text, where: str, source: str = "") -> str:
    """Message text must be a string of valid Unicode; anything else is named, never stringified."""
    if not isinstance(text, str):
        raise BadRecordError(rid, f"{where} must be a string, got {type(text).__name__}", source)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRecordError(rid, f"{where} holds a lone UTF-16 surrogate, which is not text", source) from None
    return text


def record_to_sample(record: dict, index: int, root: Path, source: str = "") -> Sample:
    """A record in either style (see the module docstring)."""
    if isinstance(record, dict) and "messages" in record and "conversations" not in record:
        return content_parts_to_sample(record, index, root, source)
    return llava_record_to_sample(record, index, root, source)


def _path_list(rid: str, value, key: str, source: str) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise BadRecordError(rid, f"'{key}' must be a path or a list of paths", source)
    for v in items:
        check_path(rid, v, f"'{key}'", source)
    return list(items)


def check_path(rid: str, ref: str, where: str, source: str) -> str:
    # The OS refuses such a name with a ValueError that names nothing; it is this record's fault.
    if "\x00" in ref:
        raise BadRecordError(rid, f"{where} holds a path with a NUL byte ({_short(ref)})", source)
    return ref


def _image_ref(rid: str, ref: str, root: Path, source: str) -> Path | bytes:
    if ref.startswith("data:"):
        head, _, payload = ref.partition(",")
        if ";base64" not in head or not payload:
            raise BadRecordError(rid, f"image data URI must be base64 ({head[:40]}...)", source)
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError:
            raise BadRecordError(rid, "image data URI is not valid base64", source) from None
    if ref.startswith(("http://", "https://")):
        raise BadRecordError(rid, f"remote image {ref[:80]!r}: vlmkit reads local files and data URIs only", source)
    return root / check_path(rid, ref, "an image reference", source).removeprefix("file://")


def content_parts_to_sample(record: dict, index: int, root: Path, source: str = "") -> Sample:
    """An OpenAI / TRL `messages` record: parts become `<image>` / `<video>` placeholders in place."""
    rid = record_id(record, index)
    turns = record.get("messages")
    if not isinstance(turns, list) or not turns:
        raise BadRecordError(rid, "missing or empty 'messages'", source)
    pool = {"image": _path_list(rid, record.get("images"), "images", source),
            "video": _path_list(rid, record.get("videos"), "videos", source)}
    taken = {"image": 0, "video": 0}
    images: list[Path | bytes] = []
    videos: list[Path] = []
    messages = []

    def next_from_pool(kind: str, t: int) -> str:
        if taken[kind] >= len(pool[kind]):
            raise BadRecordError(
                rid, f"message {t} has more {kind} parts without a path than the record's {len(pool[kind])} '{kind}s'", source)
        taken[kind] += 1
        return pool[kind][taken[kind] - 1]

    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise BadRecordError(rid, f"message {t} needs 'role' and 'content'", source)
        role = ROLE_NAMES.get(turn["role"]) if isinstance(turn["role"], str) else None
        if role is None:
            raise BadRecordError(rid, f"message {t} has unknown role {_short(turn['role'])}", source)
        content = turn["content"]
        if isinstance(content, str):
            messages.append(Message(role, check_text(rid, content, f"message {t} content", source)))
            continue
        if not isinstance(content, list):
            raise BadRecordError(rid, f"message {t} content must be a string or a list of parts", source)
        text = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text.append(check_text(rid, part.get("text"), f"message {t}: a text part's 'text'", source))
            elif kind in ("image", "image_url"):
                ref = part.get("image") or part.get("path") or part.get("url")
                if kind == "image_url":
                    url = part.get("image_url")
                    ref = url.get("url") if isinstance(url, dict) else url
                if ref is None:
                    ref = next_from_pool("image", t)
                if not isinstance(ref, str):
                    raise BadRecordError(rid, f"message {t}: an image part's reference must be a string", source)
                images.append(_image_ref(rid, ref, root, source))
                text.append(IMAGE_PLACEHOLDER)
            elif kind == "video":
                ref = part.get("video") or part.get("path") or part.get("url")
                if ref is None:
                    ref = next_from_pool("video", t)
                if not isinstance(ref, str):
                    raise BadRecordError(rid, f"message {t}: a video part's reference must be a string", source)
                videos.append(root / check_path(rid, ref, "a video reference", source).removeprefix("file://"))
                text.append(VIDEO_PLACEHOLDER)
            else:
                raise BadRecordError(rid, f"message {t} has a part of unknown type {kind!r}", source)
        messages.append(Message(role, "".join(text)))
    for kind in ("image", "video"):
        if taken[kind] < len(pool[kind]) and taken[kind] > 0:
            raise BadRecordError(rid, f"the record lists {len(pool[kind])} {kind}s but only {taken[kind]} {kind} parts use them", source)
    if not taken["image"]:
        images = [_image_ref(rid, p, root, source) for p in pool["image"]] + images
    if not taken["video"]:
        videos = [root / p for p in pool["video"]] + videos
    return Sample(id=rid, messages=messages, images=images, videos=videos)


def llava_turns(rid: str, turns: list, source: str = "") -> list[Message]:
    """LLaVA `{"from", "value"}` turns as messages; a malformed turn names the record and turn."""
    messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadRecordError(rid, f"conversation turn {t} needs 'from' and 'value'", source)
        role = ROLE_NAMES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise BadRecordError(rid, f"conversation turn {t} has unknown speaker {_short(turn['from'])}", source)
        messages.append(Message(role, check_text(rid, turn["value"], f"conversation turn {t} 'value'", source)))
    return messages


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def llava_record_to_sample(record: dict, index: int, image_root: Path, source: str = "") -> Sample:
    rid = record_id(record, index)
    if not isinstance(record, dict):
        raise BadRecordError(rid, f"record is not an object (got {type(record).__name__})", source)
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRecordError(rid, "missing or empty 'conversations'", source)
    messages = llava_turns(rid, turns, source)
    images = _path_list(rid, record.get("image"), "image", source)
    videos = _path_list(rid, record.get("video"), "video", source)
    return Sample(id=rid, messages=messages, images=[image_root / p for p in images], videos=[image_root / p for p in videos])


def write_llava_json(path: str | Path, records: list[dict]) -> None:
    atomic_write_text(Path(path), json.dumps(records, indent=1, ensure_ascii=False))
