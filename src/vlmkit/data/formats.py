"""Training-data formats, read into typed samples.

Four record styles, told apart per record by their keys (no flag; `record_format`):

* LLaVA / mix665k: `{"id", "image", "video", "conversations": [{"from": "human"|"gpt", "value"}]}`;
  `image` / `video` is a path (relative to the data folder) or a list of paths; the text places
  them with `<image>` / `<video>` placeholders, in order, or with `<image_k>` / `<video_k>`
  (1-based) to name one explicitly.
* LLaMA-Factory sharegpt: `{"conversations": [{"from", "value"}], "images", "videos", "system"}`,
  with LLaMA-Factory's default role tags (`human`, `gpt`, `system`, `function_call`,
  `observation`); `images` / `videos` are placed by `<image>` / `<video>` as in LLaVA.
* OpenAI / TRL content parts, and ms-swift / LLaMA-Factory `messages`: `{"id", "messages":
  [{"role", "content"}], "images", "videos"}` where `content` is a string (with `<image>`
  placeholders) or a list of parts: `{"type": "text", "text"}`, `{"type": "image"}` (the
  record's next entry of `images`), `{"type": "image", "image": PATH}`, `{"type": "image_url",
  "image_url": {"url": PATH | file://PATH | data:image/...;base64,...}}`, `{"type": "video"}` /
  `{"type": "video", "video": PATH}`. Each part becomes a placeholder at its place in the text.
* LLaMA-Factory alpaca: `{"instruction", "input", "output", "system", "history": [[q, a], ...],
  "images", "videos"}`: the user turn is `instruction` and `input` joined by a newline.

All of them reach the processor as the same `Sample`.
"""

from __future__ import annotations

import base64
import json
import os
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
    """A record in any of the styles of the module docstring, recognised by its keys."""
    if not isinstance(record, dict):
        return llava_record_to_sample(record, index, root, source)  # names the record "not an object"
    fmt = record_format(record, record_id(record, index), source)
    return READERS[fmt](record, index, root, source)


# Each format's name and what its record holds, for messages that list the formats a record could be.
LABELS = {"llava": "LLaVA", "sharegpt": "sharegpt (LLaMA-Factory)", "messages": "messages (OpenAI / ms-swift)",
          "alpaca": "alpaca (LLaMA-Factory)"}
SHAPES = {
    "llava": "'conversations' of {from, value} + 'image' / 'video'",
    "sharegpt": "'conversations' of {from, value} + 'images' / 'videos' / 'system'",
    "messages": "'messages' of {role, content} + 'images' / 'videos'",
    "alpaca": "'instruction' / 'input' / 'output' + 'images' / 'videos' / 'system' / 'history'",
}
SHAREGPT_KEYS = ("images", "videos", "system", "tools", "audios")
SHAREGPT_ONLY_SPEAKERS = ("function_call", "observation")


def record_format(record: dict, rid: str, source: str = "") -> str:
    """The one format whose keys the record has (`llava`, `sharegpt`, `messages`, `alpaca`); a
    record with the keys of two, or of none, is refused with the formats it could be."""
    present = {k for k, v in record.items() if v is not None}  # a parquet row's absent column is None
    evidence = {}  # format -> the keys that point to it
    if "messages" in present:
        evidence["messages"] = ["messages"]
    if "conversations" in present:
        evidence.update(_conversation_formats(record, present))
    if present & {"instruction", "output"}:
        evidence["alpaca"] = sorted(present & {"instruction", "output"})
    if len(evidence) == 1:
        return next(iter(evidence))
    if len(evidence) > 1:
        why = " or ".join(f"{LABELS[f]} (it has {', '.join(map(repr, keys))})" for f, keys in evidence.items())
        raise BadRecordError(rid, f"has the keys of several formats: it could be {why}; keep the keys of one: "
                             + "; ".join(f"{LABELS[f]}: {SHAPES[f]}" for f in evidence), source)
    if present & {"image", "video"}:
        return "llava"  # a LLaVA record without its conversation: the LLaVA reader says so
    could = ["sharegpt", "messages", "alpaca"] if present & {"images", "videos"} else list(SHAPES)
    raise BadRecordError(rid, f"is in no format vlmkit reads (its keys: {', '.join(map(repr, sorted(record))) or 'none'}); "
                         f"it could be {'; '.join(f'{LABELS[f]}: {SHAPES[f]}' for f in could)}", source)


def _conversation_formats(record: dict, present: set) -> dict[str, list[str]]:
    """LLaVA or sharegpt: LLaMA-Factory's own keys (or tool turns) say sharegpt, `image` / `video`
    say LLaVA. Without either the two read the same, as LLaVA."""
    turns = record["conversations"] if isinstance(record["conversations"], list) else []
    speakers = sorted({t["from"] for t in turns if isinstance(t, dict) and t.get("from") in SHAREGPT_ONLY_SPEAKERS})
    sharegpt = sorted(present & set(SHAREGPT_KEYS)) + [f"a {s!r} turn" for s in speakers]
    llava = sorted(present & {"image", "video"})
    if llava and sharegpt:
        return {"llava": llava, "sharegpt": sharegpt}
    return {"sharegpt": ["conversations", *sharegpt]} if sharegpt else {"llava": ["conversations", *llava]}


def _path_list(rid: str, value, key: str, source: str) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise BadRecordError(rid, f"'{key}' must be a path or a list of paths", source)
    for v in items:
        check_path(rid, v, f"'{key}'", source)
    return list(items)


def _fields(value, key: str) -> list[str]:
    """How each path of a `_path_list` value is named in messages: `image`, or `images[1]`."""
    if value is None:
        return []
    return [key] if isinstance(value, str) else [f"{key}[{i}]" for i in range(len(value))]


def _listed_media(rid: str, record: dict, root: Path, source: str) -> tuple[list, list[Path], list[str]]:
    """A record's `images` and `videos` lists (sharegpt, alpaca): images, videos, and their fields."""
    images = [_image_ref(rid, p, root, source) for p in _path_list(rid, record.get("images"), "images", source)]
    videos = [_video_ref(rid, p, root, source) for p in _path_list(rid, record.get("videos"), "videos", source)]
    return images, videos, _fields(record.get("images"), "images") + _fields(record.get("videos"), "videos")


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


def _video_ref(rid: str, ref: str, root: Path, source: str) -> Path:
    return root / check_path(rid, ref, "a video reference", source).removeprefix("file://")


def content_parts_to_sample(record: dict, index: int, root: Path, source: str = "") -> Sample:
    """An OpenAI / TRL `messages` record: parts become `<image>` / `<video>` placeholders in place."""
    rid = record_id(record, index)
    turns = record.get("messages")
    if not isinstance(turns, list) or not turns:
        raise BadRecordError(rid, "missing or empty 'messages'", source)
    parts = _PartReader(rid, record, root, source)
    messages = []
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
        messages.append(Message(role, "".join(parts.read(t, j, part) for j, part in enumerate(content))))
    return parts.sample(messages)


class _PartReader:
    """The content parts of one `messages` record, read in order: a part without its own path
    takes the record's next `images` / `videos` entry (its pool)."""

    def __init__(self, rid: str, record: dict, root: Path, source: str):
        self.rid, self.root, self.source = rid, root, source
        self.record = record
        self.pool = {"image": _path_list(rid, record.get("images"), "images", source),
                     "video": _path_list(rid, record.get("videos"), "videos", source)}
        self.taken = {"image": 0, "video": 0}
        self.media: dict[str, list] = {"image": [], "video": []}  # (reference, field) in order

    def _from_pool(self, kind: str, t: int) -> tuple[str, str]:
        pool, n = self.pool[kind], self.taken[kind]
        if n >= len(pool):
            raise BadRecordError(
                self.rid, f"message {t} has more {kind} parts without a path than the record's {len(pool)} '{kind}s'", self.source)
        self.taken[kind] += 1
        return pool[n], _fields(self.record.get(f"{kind}s"), f"{kind}s")[n]

    def read(self, t: int, j: int, part) -> str:
        """Part j of message t, as text: its text, or the placeholder of its image / video."""
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            return check_text(self.rid, part.get("text"), f"message {t}: a text part's 'text'", self.source)
        if kind not in ("image", "image_url", "video"):
            raise BadRecordError(self.rid, f"message {t} has a part of unknown type {kind!r}", self.source)
        media = "video" if kind == "video" else "image"
        ref = part.get(media) or part.get("path") or part.get("url")
        field = f"messages[{t}].content[{j}]"
        if kind == "image_url":
            url = part.get("image_url")
            ref = url.get("url") if isinstance(url, dict) else url
        if ref is None:
            ref, field = self._from_pool(media, t)
        if not isinstance(ref, str):
            what = "a video" if media == "video" else "an image"
            raise BadRecordError(self.rid, f"message {t}: {what} part's reference must be a string", self.source)
        read = _video_ref if media == "video" else _image_ref
        self.media[media].append((read(self.rid, ref, self.root, self.source), field))
        return VIDEO_PLACEHOLDER if media == "video" else IMAGE_PLACEHOLDER

    def sample(self, messages: list[Message]) -> Sample:
        for kind in ("image", "video"):
            taken, listed = self.taken[kind], len(self.pool[kind])
            if 0 < taken < listed:
                raise BadRecordError(self.rid, f"the record lists {listed} {kind}s but only {taken} {kind} parts use them", self.source)
            if not taken:  # string content: the listed files, placed by `<image>` / `<video>` in the text
                read = _video_ref if kind == "video" else _image_ref
                listed_media = [read(self.rid, p, self.root, self.source) for p in self.pool[kind]]
                self.media[kind] = list(zip(listed_media, _fields(self.record.get(f"{kind}s"), f"{kind}s"))) + self.media[kind]
        images, videos = self.media["image"], self.media["video"]
        return Sample(id=self.rid, messages=messages, images=[r for r, _ in images], videos=[r for r, _ in videos],
                      media_fields=[f for _, f in images + videos])


def llava_turns(rid: str, turns: list, source: str = "", roles: dict[str, str] = ROLE_NAMES) -> list[Message]:
    """LLaVA `{"from", "value"}` turns as messages; a malformed turn names the record and turn.
    `roles`: speaker -> role (sharegpt adds LLaMA-Factory's tool turns)."""
    messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadRecordError(rid, f"conversation turn {t} needs 'from' and 'value'", source)
        role = roles.get(turn["from"]) if isinstance(turn["from"], str) else None
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
    return Sample(id=rid, messages=messages, images=[image_root / p for p in images], videos=[image_root / p for p in videos],
                  media_fields=_fields(record.get("image"), "image") + _fields(record.get("video"), "video"))


# LLaMA-Factory's default sharegpt role tags. Its tool turns have no role of their own in the
# chat templates vlmkit renders with: a call is the assistant's text, a result comes back as a
# user turn (where LLaMA-Factory places it too), both verbatim.
SHAREGPT_ROLES = {**ROLE_NAMES, "function_call": "assistant", "observation": "user"}


def sharegpt_record_to_sample(record: dict, index: int, root: Path, source: str = "") -> Sample:
    """A LLaMA-Factory sharegpt record: `conversations` turns, top-level `system`, `images` / `videos`."""
    rid = record_id(record, index)
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRecordError(rid, "missing or empty 'conversations'", source)
    for key, why in (("tools", "vlmkit has no tool-definition formatting; put the definitions in the 'system' text"),
                     ("audios", "vlmkit reads images and videos, not audio")):
        if record.get(key):
            raise BadRecordError(rid, f"has {key!r}, which would be dropped: {why}", source)
    messages = llava_turns(rid, turns, source, SHAREGPT_ROLES)
    for t, m in enumerate(messages[1:], 1):
        if m.role == "system":
            raise BadRecordError(rid, f"conversation turn {t} is a system turn; only the first turn may be", source)
    system = record.get("system")
    if system is not None:
        if messages[0].role == "system":
            raise BadRecordError(rid, "has both a 'system' key and a first system turn; keep one", source)
        if check_text(rid, system, "'system'", source):
            messages.insert(0, Message("system", system))
    images, videos, fields = _listed_media(rid, record, root, source)
    return Sample(id=rid, messages=messages, images=images, videos=videos, media_fields=fields)


def alpaca_record_to_sample(record: dict, index: int, root: Path, source: str = "") -> Sample:
    """A LLaMA-Factory alpaca record: [system], `history` pairs, then `instruction` + "\n" + `input`
    as the user turn and `output` as the answer."""
    rid = record_id(record, index)

    def text(key: str) -> str:
        value = record.get(key)
        return "" if value is None else check_text(rid, value, repr(key), source)

    prompt = "\n".join(p for p in (text("instruction"), text("input")) if p)
    if not prompt:
        raise BadRecordError(rid, "alpaca record has no prompt: 'instruction' and 'input' are both missing or empty", source)
    if record.get("output") is None:
        raise BadRecordError(rid, "alpaca record has no 'output' (the answer to learn)", source)
    messages = [Message("system", text("system"))] if text("system") else []
    history = record.get("history")
    if history is not None and not isinstance(history, list):
        raise BadRecordError(rid, "'history' must be a list of [question, answer] pairs", source)
    for h, pair in enumerate(history or []):
        if not isinstance(pair, list) or len(pair) != 2:
            raise BadRecordError(rid, f"history[{h}] must be a [question, answer] pair", source)
        messages += [Message("user", check_text(rid, pair[0], f"history[{h}][0]", source)),
                     Message("assistant", check_text(rid, pair[1], f"history[{h}][1]", source))]
    messages += [Message("user", prompt), Message("assistant", text("output"))]
    images, videos, fields = _listed_media(rid, record, root, source)
    return Sample(id=rid, messages=messages, images=images, videos=videos, media_fields=fields)


READERS = {"llava": llava_record_to_sample, "sharegpt": sharegpt_record_to_sample,
           "messages": content_parts_to_sample, "alpaca": alpaca_record_to_sample}


def with_embedded_images(record: dict, n: int) -> dict:
    """The record with `n` stand-in image names (`#0`, `#1`, ...) under the key its own format
    lists images in (`image` for LLaVA, else `images`), for sources whose images are embedded
    (tar members, parquet columns) rather than named; any paths it named are replaced."""
    rest = {k: v for k, v in record.items() if k not in ("image", "images")}
    try:
        key = "image" if record_format(rest, "") == "llava" else "images"
    except BadRecordError:
        key = "image"  # no known shape: the LLaVA reader names what is missing
    return {**rest, key: [f"#{j}" for j in range(n)]}


def missing_media(item) -> list[str]:
    """Each image or video file a sample (or preference pair) names that is not a file, as
    `ABSOLUTE PATH (field 'images[0]')`; inline images (bytes) are never missing."""
    refs = [*item.images, *item.videos]
    fields = getattr(item, "media_fields", None) or []
    missing = []
    for k, ref in enumerate(refs):
        if isinstance(ref, Path) and not os.path.isfile(os.fspath(ref)):
            field = f"field {fields[k]!r}" if k < len(fields) else f"image {k + 1} of the record"
            missing.append(f"{ref.resolve()} ({field})")
    return missing


def write_llava_json(path: str | Path, records: list[dict]) -> None:
    atomic_write_text(Path(path), json.dumps(records, indent=1, ensure_ascii=False))
