"""Preference pairs for DPO, read from the three formats in common use into one typed record.

- TRL conversational: `images`, `prompt`, `chosen`, `rejected`; prompt/chosen/rejected are
  message lists whose `content` is a string or a list of `{"type": "image"|"text"}` parts
  (TRL's plain-string "standard" variant is accepted too).
- RLAIF-V: `image`, `question`, `chosen`, `rejected` (strings).
- LLaVA-RLHF: `conversations` (the prompt, LLaVA style), `output_1`, `output_2`, and
  `preference` (1 or 2: which output is preferred).
- LLaMA-Factory ranking data: sharegpt (`conversations` ending with the user turn, `chosen` and
  `rejected` as one `{"from": "gpt", "value"}` turn each, `images`, `system`) or alpaca
  (`instruction`, `input`, `chosen` and `rejected` strings, `images`).

The format is recognised per record from its keys. A record that lacks a side, or whose
preference is not 1 or 2, raises `BadRecordError` at read time, before any training step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from vlmkit.data.formats import (
    ROLE_NAMES,
    SHAREGPT_ROLES,
    BadRecordError,
    Message,
    Sample,
    alpaca_record_to_sample,
    check_path,
    check_text,
    llava_turns,
    parse_each,
    read_json_records,
    record_id,
    sharegpt_record_to_sample,
)
from vlmkit.processing.prompt import IMAGE_PLACEHOLDER

FORMATS = ("trl", "rlaif-v", "llava-rlhf", "sharegpt", "alpaca")


@dataclass
class PreferencePair:
    id: str
    prompt: list[Message]  # ends with the user turn the two responses answer
    chosen: str
    rejected: str
    images: list[Path] = field(default_factory=list)
    # Reference-model log-probs of each response, when the data carries them.
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None

    @property
    def videos(self) -> list[Path]:
        """Preference pairs read images only (a `Sample` has both)."""
        return []

    def sample(self, side: str) -> Sample:
        response = self.chosen if side == "chosen" else self.rejected
        return Sample(f"{self.id}/{side}", [*self.prompt, Message("assistant", response)], list(self.images))


def detect_format(record: dict) -> str | None:
    if "output_1" in record or "output_2" in record or "preference" in record:
        return "llava-rlhf"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if "question" in record:
        return "rlaif-v"
    if "prompt" in record:
        return "trl"
    return None


def read_preference_file(path: str | Path, image_folder: str | Path | None = None) -> list[PreferencePair | BadRecordError]:
    """Every record of a JSON list or JSONL file, as a pair or as the error that rules it out
    (the caller decides whether a bad record stops the run or is skipped)."""
    path = Path(path)
    root = Path(image_folder) if image_folder else path.parent
    records = read_json_records(path, "preference data", lenient=True)
    return parse_each(records, parse_preference_record, root, str(path))


def parse_preference_record(record: dict, index: int, image_root: Path, source: str = "") -> PreferencePair:
    rid = record_id(record, index)
    if not isinstance(record, dict):
        raise BadRecordError(rid, f"record is not an object (got {type(record).__name__})", source)
    fmt = detect_format(record)
    if fmt is None:
        raise BadRecordError(rid, f"is not a preference record in any known format {FORMATS} (keys: {sorted(record)})", source)
    parse = {"trl": _trl, "rlaif-v": _rlaif_v, "llava-rlhf": _llava_rlhf, "sharegpt": _sharegpt, "alpaca": _alpaca}[fmt]
    pair = parse(record, rid, image_root, source)
    for side in ("chosen", "rejected"):
        if not getattr(pair, side).strip():
            raise BadRecordError(rid, f"{fmt} record has an empty {side!r} response", source)
    refs = [record.get("ref_chosen_logp"), record.get("ref_rejected_logp")]
    if any(r is not None for r in refs):
        if any(r is None for r in refs):
            raise BadRecordError(rid, "carries one reference log-prob but not the other", source)
        if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in refs):
            raise BadRecordError(rid, f"reference log-probs must be finite numbers, got {refs[0]!r:.40} and {refs[1]!r:.40}", source)
        pair.ref_chosen_logp, pair.ref_rejected_logp = float(refs[0]), float(refs[1])
    return pair


def _require(record: dict, keys: tuple[str, ...], rid: str, fmt: str, source: str) -> None:
    missing = [k for k in keys if record.get(k) in (None, "", [])]
    if missing:
        raise BadRecordError(rid, f"{fmt} record is missing {missing} (a pair needs both sides)", source)


def _image_paths(value, root: Path, rid: str, source: str) -> list[Path]:
    items = [] if value is None else value if isinstance(value, list) else [value]
    paths = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("path")
        if not isinstance(item, str):
            raise BadRecordError(rid, "images must be file paths (or {'path': ...}); decode embedded images to files first", source)
        paths.append(root / check_path(rid, item, "an image path", source))
    return paths


def _with_placeholders(text: str, n_images: int) -> str:
    # Datasets often leave the image implicit; the processor needs one placeholder per image.
    missing = n_images - text.count(IMAGE_PLACEHOLDER)
    return IMAGE_PLACEHOLDER * missing + ("\n" if missing > 0 else "") + text


def _content_text(content, rid: str, source: str) -> str:
    if isinstance(content, str):
        return check_text(rid, content, "message content", source)
    if not isinstance(content, list):
        raise BadRecordError(rid, f"message content must be text or a list of parts, got {type(content).__name__}", source)
    pieces = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            # LLaVA-style prompts put the image on its own line before the text.
            follows = k + 1 < len(content) and isinstance(content[k + 1], dict) and content[k + 1].get("type") == "text"
            pieces.append(IMAGE_PLACEHOLDER + ("\n" if follows else ""))
        elif kind == "text":
            pieces.append(check_text(rid, part.get("text"), "a text part's 'text'", source))
        else:
            raise BadRecordError(rid, f"unknown content part {part!r:.80}", source)
    return "".join(pieces)


def _messages(value, rid: str, source: str, field_name: str) -> list[Message]:
    if isinstance(value, str):
        return [Message("user" if field_name == "prompt" else "assistant", check_text(rid, value, repr(field_name), source))]
    if not isinstance(value, list):
        raise BadRecordError(rid, f"{field_name!r} must be a message list or a string", source)
    out = []
    for m in value:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRecordError(rid, f"{field_name!r} messages need 'role' and 'content'", source)
        role = ROLE_NAMES.get(m["role"]) if isinstance(m["role"], str) else None
        if role is None:
            raise BadRecordError(rid, f"{field_name!r} has unknown role {m['role']!r:.60}", source)
        out.append(Message(role, _content_text(m["content"], rid, source)))
    return out


def _response(messages: list[Message], rid: str, side: str, source: str) -> str:
    if not messages or any(m.role != "assistant" for m in messages):
        raise BadRecordError(rid, f"{side!r} must hold assistant message(s) only", source)
    return "".join(m.content for m in messages)


def _trl(record: dict, rid: str, root: Path, source: str) -> PreferencePair:
    _require(record, ("prompt", "chosen", "rejected"), rid, "TRL", source)
    images = _image_paths(record.get("images", record.get("image")), root, rid, source)
    prompt = _messages(record["prompt"], rid, source, "prompt")
    _place_images(prompt, images, rid, "TRL", source)
    chosen = _response(_messages(record["chosen"], rid, source, "chosen"), rid, "chosen", source)
    rejected = _response(_messages(record["rejected"], rid, source, "rejected"), rid, "rejected", source)
    return PreferencePair(rid, prompt, chosen, rejected, images)


def _rlaif_v(record: dict, rid: str, root: Path, source: str) -> PreferencePair:
    _require(record, ("question", "chosen", "rejected"), rid, "RLAIF-V", source)
    images = _image_paths(record.get("image"), root, rid, source)
    question, chosen, rejected = (check_text(rid, record[k], f"RLAIF-V {k!r}", source) for k in ("question", "chosen", "rejected"))
    prompt = [Message("user", _with_placeholders(question, len(images)))]
    return PreferencePair(rid, prompt, chosen, rejected, images)


def _llava_rlhf(record: dict, rid: str, root: Path, source: str) -> PreferencePair:
    _require(record, ("conversations", "output_1", "output_2", "preference"), rid, "LLaVA-RLHF", source)
    # 1 or 2 exactly (also "1"/"2" and 1.0/2.0, as some exports write them); 2.7 is not 2.
    value = record["preference"]
    preferred = 0
    if isinstance(value, str) and value.strip() in ("1", "2"):
        preferred = int(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and value in (1, 2):
        preferred = int(value)
    if preferred not in (1, 2):
        raise BadRecordError(rid, f"LLaVA-RLHF 'preference' must be 1 or 2, got {record['preference']!r}", source)
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise BadRecordError(rid, "'conversations' must be a list", source)
    prompt = llava_turns(rid, turns, source)
    if not prompt or prompt[-1].role != "user":
        raise BadRecordError(rid, "LLaVA-RLHF conversations must end with the human turn the outputs answer", source)

    def text(out, name):
        value = out.get("value") if isinstance(out, dict) else out
        if not isinstance(value, str) or not value.strip():
            raise BadRecordError(rid, f"LLaVA-RLHF {name!r} has no response text", source)
        return check_text(rid, value, f"LLaVA-RLHF {name!r}", source)

    outputs = [text(record["output_1"], "output_1"), text(record["output_2"], "output_2")]
    images = _image_paths(record.get("image"), root, rid, source)
    return PreferencePair(rid, prompt, outputs[preferred - 1], outputs[2 - preferred], images)


def _listed_images(sample: Sample, rid: str, source: str) -> list[Path]:
    if sample.videos or not all(isinstance(i, Path) for i in sample.images):
        raise BadRecordError(rid, "preference pairs take image files only (no videos, no embedded images)", source)
    return list(sample.images)


def _sharegpt(record: dict, rid: str, root: Path, source: str) -> PreferencePair:
    """LLaMA-Factory's sharegpt ranking record: the conversation up to the user turn both sides
    answer, and each side as one assistant turn."""
    _require(record, ("conversations", "chosen", "rejected"), rid, "LLaMA-Factory sharegpt", source)
    # The prompt is an ordinary sharegpt record; its errors name this record.
    prompt_record = {**{k: v for k, v in record.items() if k not in ("chosen", "rejected")}, "id": rid}
    sample = sharegpt_record_to_sample(prompt_record, 0, root, source)
    if sample.messages[-1].role != "user":
        raise BadRecordError(rid, "LLaMA-Factory sharegpt ranking 'conversations' must end with the turn both sides answer", source)

    def side(name: str) -> str:
        value = record[name]
        if isinstance(value, dict):
            turns = llava_turns(rid, [value], source, SHAREGPT_ROLES)
            if turns[0].role != "assistant":
                raise BadRecordError(rid, f"{name!r} must be an assistant turn ('from': 'gpt'), not {value.get('from')!r:.40}", source)
            return turns[0].content
        return check_text(rid, value, repr(name), source)

    images = _listed_images(sample, rid, source)
    _place_images(sample.messages, images, rid, "LLaMA-Factory sharegpt", source)
    return PreferencePair(rid, sample.messages, side("chosen"), side("rejected"), images)


def _alpaca(record: dict, rid: str, root: Path, source: str) -> PreferencePair:
    """LLaMA-Factory's alpaca ranking record: `instruction` (+ `input`), and the two answers."""
    _require(record, ("instruction", "chosen", "rejected"), rid, "LLaMA-Factory alpaca", source)
    prompt_record = {**{k: v for k, v in record.items() if k not in ("chosen", "rejected")}, "id": rid, "output": ""}
    sample = alpaca_record_to_sample(prompt_record, 0, root, source)
    chosen, rejected = (check_text(rid, record[k], repr(k), source) for k in ("chosen", "rejected"))
    images = _listed_images(sample, rid, source)
    _place_images(sample.messages, images, rid, "LLaMA-Factory alpaca", source)
    return PreferencePair(rid, sample.messages[:-1], chosen, rejected, images)


def _place_images(prompt: list[Message], images: list[Path], rid: str, fmt: str, source: str) -> None:
    """A prompt whose text places no image by `<image>` gets them all at the start of its first
    user turn (datasets often leave the image implicit)."""
    if not images or any(IMAGE_PLACEHOLDER in m.content for m in prompt):
        return
    first_user = next((m for m in prompt if m.role == "user"), None)
    if first_user is None:
        raise BadRecordError(rid, f"{fmt} prompt has no user turn", source)
    first_user.content = _with_placeholders(first_user.content, len(images))
