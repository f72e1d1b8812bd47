"""From a conversation with images to model inputs: the chat template, placeholder expansion
and assistant-only labels.

The labels come from the tokenizer's own chat template, never from per-template rules written
here: the template is rendered once for the whole conversation and once for each prefix that
ends just before / just after an assistant turn. The characters between those two renderings
are that turn's span; token offsets map spans to labels. A template whose prefixes are not
prefixes of the whole rendering, or a turn that ends up with no label, is an error that names
the sample, never a silently zero-loss sample.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vlmkit.core.types import IGNORE_INDEX, BadRecordError, Message, Sample
from vlmkit.processing.base import ImageProcessor, ProcessedImage, TokenLayout
from vlmkit.processing.images import ImageLoadError, load_image
from vlmkit.processing.mrope import POSITION_RULES, sample_positions
from vlmkit.processing.video import (ProcessedVideo, VideoInput, VideoLoadError, VideoOptions, load_video, placeholder_text,
                                     video_key)

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
# `<image>` / `<video>` take the next input of their kind; `<image_k>` / `<video_k>` name the k-th.
PLACEHOLDER_RE = re.compile(r"<(image|video)(?:_(\d+))?>")
# Chat templates whose output depends on the types of a turn's content parts (SmolVLM / Idefics2
# write "User:" before a leading image, "User: " before text) are wrapped at import so that a
# string turn that starts with IMAGE_PART_MARK reads as an image part followed by the text; the
# chat processor writes the mark before a turn that opens with an image when the template
# carries IMAGE_PARTS_FLAG.
IMAGE_PART_MARK = "\ue000"
IMAGE_PARTS_FLAG = "vlmkit: image parts"


@dataclass
class VisualSpan:
    """One image or video of a sample, in the order its tokens appear."""

    kind: str  # "image" | "video"
    index: int  # 1-based, within its kind: the k of its `<image_k>` / `<video_k>` sentinel
    groups: int  # token groups (pixel rows): 1 for an image, frame groups for a video
    visual_tokens: int
    grid_thw: tuple[int, int, int] | None = None  # LLM-side (t, h, w) grid when the family has one
    timestamps: list[float] = field(default_factory=list)  # seconds of each sampled frame (video)


@dataclass
class EncodedSample:
    id: str
    input_ids: torch.Tensor  # (T,)
    labels: torch.Tensor  # (T,), IGNORE_INDEX outside assistant spans
    image_keys: list[str] = field(default_factory=list)  # for caching frozen-tower features, one per row
    visuals: list[VisualSpan] = field(default_factory=list)
    # Each token group's views, grids and arrangement, in token order (what the model encodes).
    images: list[ProcessedImage] = field(default_factory=list)
    # (3, T) M-RoPE positions (Qwen2-VL family), and what generation adds to the step counter.
    position_ids: torch.Tensor | None = None
    rope_delta: int = 0

    @property
    def layouts(self) -> list[TokenLayout]:
        """Each token group's layout, in token order (read from `images`, where it is carried)."""
        return [image.layout for image in self.images]


@dataclass
class _Visual:
    kind: str
    index: int
    groups: list[ProcessedImage]
    keys: list[str]
    grid_thw: tuple[int, int, int] | None = None
    timestamps: list[float] = field(default_factory=list)
    video: ProcessedVideo | None = None


def _as_dicts(messages: list[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _image_key(ref) -> str:
    if isinstance(ref, bytes):
        return "bytes:" + hashlib.sha256(ref).hexdigest()[:16]
    return str(ref)


class ChatProcessor:
    """Turns `Sample`s into token ids, labels and pixels for one model.

    Several images and videos may be interleaved with the text. When a sample holds more than
    one (`sentinels="auto"`; or always / never), each one's token group is preceded by a
    sentinel `<image_k>` / `<video_k>` written as text, so the model can tell which group is
    which and a question can refer to "image 2". The sentinel is tokenised by the LM's own
    vocabulary (one token when the tokenizer already has it), not added as a new special token:
    a new token would need an untrained, resized embedding table that checkpoints of a frozen
    or pretrained LM do not carry.
    """

    def __init__(self, tokenizer, image_processor: ImageProcessor, image_token: str, max_length: int,
                 max_image_pixels: int = 64_000_000, video: VideoOptions | None = None, sentinels: str = "auto",
                 position_rule: str = "1d", image_formats=None, system_prompt: str | None = None, video_token: str | None = None,
                 instruction_encoder: Callable[[str], torch.Tensor] | None = None):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        # A video's slots: the family's own video token (Qwen2-VL's <|video_pad|>), else the image token.
        self.video_token = video_token
        # For a connector that reads the instruction: the text of the message holding an image
        # (its placeholders removed, and the newline after a leading one) -> the connector's
        # token ids, stored on each of its groups (`ProcessedImage.instruction_ids`).
        self.instruction_encoder = instruction_encoder
        # How the language model numbers positions (`processing.mrope.POSITION_RULES`): "mrope"
        # gives each encoded sample its (3, T) positions.
        if position_rule not in POSITION_RULES:
            raise ValueError(f"unknown position rule {position_rule!r}; known: {', '.join(POSITION_RULES)}")
        self.position_rule = position_rule
        self.image_processor = image_processor
        self.image_token = image_token
        self.max_length = max_length
        self.max_image_pixels = max_image_pixels
        self.image_formats = image_formats  # None: images.DEFAULT_IMAGE_FORMATS
        self.video = video or VideoOptions()
        if sentinels not in ("auto", "always", "never"):
            raise ValueError(f"sentinels must be 'auto', 'always' or 'never', got {sentinels!r}")
        self.sentinels = sentinels
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("ChatProcessor needs a fast tokenizer (character offsets map spans to labels)")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template")
        template = tokenizer.chat_template
        self.image_mark = IMAGE_PART_MARK if isinstance(template, str) and IMAGE_PARTS_FLAG in template else ""

    # ---- images and videos --------------------------------------------------------------
    def load_images(self, sample: Sample):
        processed = []
        for path in sample.images:
            processed.append(self._load_image(sample.id, path))
        return processed

    def _load_image(self, sample_id: str, ref, processor=None) -> ProcessedImage:
        try:
            image = load_image(ref, max_pixels=self.max_image_pixels, formats=self.image_formats)
        except (ImageLoadError, FileNotFoundError) as e:
            raise BadRecordError(sample_id, str(e)) from None
        try:
            return (processor or self.image_processor).preprocess(image)
        except ValueError as e:  # e.g. Qwen2-VL's aspect-ratio limit
            raise BadRecordError(sample_id, f"{_image_key(ref)[:200]}: {e}") from None

    def _load_video(self, sample_id: str, path: Path) -> ProcessedVideo:
        try:
            return load_video(self.image_processor, path, self.video)
        except (VideoLoadError, FileNotFoundError) as e:
            raise BadRecordError(sample_id, str(e)) from None

    def _plan(self, sample_id: str, messages: list[Message], counts: dict[str, int],
              pattern: re.Pattern = PLACEHOLDER_RE) -> list[tuple[str, int]]:
        """(kind, 0-based input index) for each placeholder, in the order they appear."""
        found: list[tuple[str, int | None]] = []
        for t, m in enumerate(messages):
            if m.role == "assistant" and (match := pattern.search(m.content)):
                # Its image tokens would sit inside the supervised span and become targets.
                raise BadRecordError(sample_id, f"assistant turn {t} holds the placeholder {match.group(0)!r}; "
                                                "images and videos belong in user turns")
            for match in pattern.finditer(m.content):
                found.append((match.group(1), int(match.group(2)) if match.group(2) else None))
        plan = []
        for kind in ("image", "video"):
            mine = [k for kd, k in found if kd == kind]
            bare = sum(k is None for k in mine)
            n = counts[kind]
            if bare and len(mine) != bare:
                raise BadRecordError(sample_id, f"mixes <{kind}> and <{kind}_k> placeholders; use one style")
            if len(mine) != n:
                raise BadRecordError(
                    sample_id,
                    f"has {n} {kind}(s) but {len(mine)} <{kind}> placeholder(s); each {kind} needs exactly one",
                )
            if not bare:
                bad = sorted({k for k in mine if not 1 <= k <= n} | {k for k in mine if mine.count(k) > 1})
                if bad:
                    raise BadRecordError(sample_id, f"<{kind}_k> placeholders must name each of {kind}s 1..{n} once; check {bad}")
        nxt = {"image": 0, "video": 0}
        for kind, k in found:
            if k is None:
                plan.append((kind, nxt[kind]))
                nxt[kind] += 1
            else:
                plan.append((kind, k - 1))
        return plan

    def _visuals(self, sample: Sample, plan: list[tuple[str, int]]) -> list[_Visual]:
        out = []
        processor = self.image_processor.for_sample(len(sample.images))
        for kind, i in plan:
            if kind == "image":
                p = self._load_image(sample.id, sample.images[i], processor)
                thw = p.layout.parts.get("grid_thw")
                merge = p.layout.parts.get("merge", 1)
                grid = (thw[0], thw[1] // merge, thw[2] // merge) if thw else None
                out.append(_Visual("image", i + 1, [p], [_image_key(sample.images[i])], grid))
            else:
                path = Path(sample.videos[i])
                v = self._load_video(sample.id, path)
                keys = [video_key(path, self.video, g) for g in range(len(v.groups))]
                out.append(_Visual("video", i + 1, v.groups, keys, v.grid_thw, v.timestamps, v))
        return out

    def _use_sentinels(self, n: int) -> bool:
        return self.sentinels == "always" or (self.sentinels == "auto" and n > 1)

    def _expand_placeholders(self, sample: Sample, visuals: list[_Visual], pattern: re.Pattern = PLACEHOLDER_RE) -> list[Message]:
        sentinels = self._use_sentinels(len(visuals))
        it = iter(visuals)

        def expand(_match) -> str:
            v = next(it)
            token = self.video_token if v.kind == "video" and self.video_token else self.image_token
            if v.kind == "video":
                text = placeholder_text(self.image_processor, v.video, token)
            else:
                text = "".join(self.image_processor.placeholder_text(g.layout, token) for g in v.groups)
            return (f"<{v.kind}_{v.index}>" if sentinels else "") + text

        def expanded(content: str) -> str:
            text = self.image_processor.finish_text(pattern.sub(expand, content))
            # A turn that opens with an image is, to a parts template, one whose first part is an image.
            lead = pattern.match(content)
            return (self.image_mark if lead and lead.group(1) == "image" and not sentinels else "") + text

        return [Message(m.role, expanded(m.content) if pattern.search(m.content) else m.content) for m in sample.messages]

    def _prepare(self, sample: Sample, pattern: re.Pattern = PLACEHOLDER_RE) -> tuple[list[_Visual], list[Message]]:
        plan = self._plan(sample.id, sample.messages, {"image": len(sample.images), "video": len(sample.videos)}, pattern)
        visuals = self._visuals(sample, plan)
        if self.instruction_encoder is not None:
            self._attach_instructions(sample, visuals, pattern)
        return visuals, self._expand_placeholders(sample, visuals, pattern)

    def _attach_instructions(self, sample: Sample, visuals: list[_Visual], pattern: re.Pattern) -> None:
        """Each visual's instruction (the text of the message holding it, its placeholders removed,
        and the newline after a leading one) in the connector's own ids, on each of its groups."""
        # Placeholders are planned in order of appearance: the k-th visual sits in the k-th
        # placeholder's message.
        holders = [m for m in sample.messages for _ in pattern.finditer(m.content)]
        for v, m in zip(visuals, holders):
            text = pattern.sub("", m.content)
            if pattern.match(m.content) and text.startswith("\n"):
                text = text[1:]  # the newline chat / eval write after a leading placeholder
            ids = self.instruction_encoder(text)
            for g in v.groups:
                g.instruction_ids = ids

    @staticmethod
    def _outputs(visuals: list[_Visual]):
        groups = [g for v in visuals for g in v.groups]
        layouts = [g.layout for g in groups]
        keys = [k for v in visuals for k in v.keys]
        spans = [VisualSpan(v.kind, v.index, len(v.groups), sum(g.layout.slots for g in v.groups), v.grid_thw,
                            list(v.timestamps)) for v in visuals]
        return layouts, keys, spans, groups

    def _with_positions(self, sample: EncodedSample) -> EncodedSample:
        if self.position_rule == "mrope":
            sample.position_ids = sample_positions(sample, self._slot_ids())
            sample.rope_delta = int(sample.position_ids.max()) + 1 - len(sample.input_ids) if len(sample.input_ids) else 0
        return sample

    # ---- text ---------------------------------------------------------------------------
    def with_leading_images(self, text: str, n: int) -> str:
        """A user turn of `n` images then `text`, laid out as the family's processor lays out the
        content list [image, ..., text]: `<image>` then the text directly where its template puts
        the text right after the image (Llama 3.2 Vision, Qwen2-VL, Gemma 3, Idefics), `<image>\n`
        where it puts a newline there (LLaVA) or cannot render content lists (vlmkit's own
        templates, whose convention `<image>\n` is)."""
        return (IMAGE_PLACEHOLDER + self._image_text_separator) * n + text

    @functools.cached_property
    def _image_text_separator(self) -> str:
        from jinja2 import TemplateError

        probe = "\ue003"
        try:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": probe}]}], tokenize=False)
        except (TemplateError, TypeError, ValueError):  # a template for string contents only, given a list
            return "\n"
        at = rendered.find(probe) if isinstance(rendered, str) else -1
        return "\n" if at <= 0 or rendered[at - 1] == "\n" else ""

    def _render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        if self.system_prompt is not None and messages and messages[0].role != "system":
            messages = [Message("system", self.system_prompt), *messages]
        return self.tokenizer.apply_chat_template(_as_dicts(messages), tokenize=False, add_generation_prompt=add_generation_prompt)

    def assistant_spans(self, sample_id: str, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
        full = self._render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            if i == 0:
                raise BadRecordError(sample_id, "starts with an assistant turn; a conversation starts with a user (or system) turn")
            before = self._render(messages[:i], add_generation_prompt=True)
            through = self._render(messages[: i + 1])
            if not full.startswith(before) or not full.startswith(through) or len(through) <= len(before):
                raise BadRecordError(
                    sample_id,
                    f"cannot locate assistant turn {i} in the chat template's rendering "
                    "(the template does not render conversations prefix by prefix)",
                )
            spans.append((len(before), len(through)))
        return full, spans

    def encode(self, sample: Sample, train: bool = True) -> EncodedSample:
        visuals, messages = self._prepare(sample)
        layouts, keys, visual_spans, groups = self._outputs(visuals)
        if train and not any(m.role == "assistant" for m in messages):
            raise BadRecordError(sample.id, "has no assistant turn to learn from")
        text, spans = self.assistant_spans(sample.id, messages)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if len(ids) > self.max_length:
            raise BadRecordError(
                sample.id,
                f"is {len(ids)} tokens long ({sum(l.total_tokens for l in layouts)} of them for images), "
                f"longer than the context of {self.max_length}; image tokens are never truncated",
            )
        labels = [IGNORE_INDEX] * len(ids)
        for t, (start, _end) in enumerate(enc["offset_mapping"]):
            if any(s <= start < e for s, e in spans):
                labels[t] = ids[t]
        for turn, (s, e) in enumerate(spans):
            if not any(s <= start < e for start, _ in enc["offset_mapping"]):
                raise BadRecordError(sample.id, f"assistant turn {turn} has no tokens to supervise")
        self._check_image_tokens(sample.id, ids, layouts)
        return self._with_positions(EncodedSample(
            id=sample.id,
            input_ids=torch.tensor(ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            image_keys=keys,
            visuals=visual_spans,
            images=groups,
        ))

    def encode_prompt(self, messages: list[Message], images: list, placeholder_re: re.Pattern | None = None) -> EncodedSample:
        """A generation prompt: the conversation so far plus the assistant header.

        `images` holds the visual inputs in placeholder order: images (paths, bytes, PIL) and
        videos (`VideoInput`). A bare `<image>` placeholder may stand for a video input (the input
        decides how it expands), so callers that only know "one placeholder per input" work.

        `placeholder_re` replaces `PLACEHOLDER_RE` (same two groups: kind, optional index) for
        callers whose text is a user's literal words: the server marks its images with a
        per-request marker, so "<video>" or "<image_2>" typed by a user stays text."""
        pattern = placeholder_re or PLACEHOLDER_RE
        kinds = ["video" if isinstance(x, VideoInput) else "image" for x in images]
        order = iter(kinds)

        def retag(match) -> str:
            if match.group(2) is None and match.group(1) == "image":
                kind = next(order, "image")
                return match.group(0).replace("image", kind, 1)
            if match.group(2) is None:
                next(order, None)
            return match.group(0)

        messages = [Message(m.role, pattern.sub(retag, m.content)) for m in messages]
        sample = Sample(id="prompt", messages=messages,
                        images=[x for x in images if not isinstance(x, VideoInput)],
                        videos=[x.path for x in images if isinstance(x, VideoInput)])
        visuals, expanded = self._prepare(sample, pattern)
        layouts, keys, spans, groups = self._outputs(visuals)
        text = self._render(expanded, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_length:
            raise BadRecordError("prompt", f"is {len(ids)} tokens long, longer than the context of {self.max_length}")
        self._check_image_tokens("prompt", ids, layouts)
        return self._with_positions(EncodedSample("prompt", torch.tensor(ids), torch.full((len(ids),), IGNORE_INDEX),
                                                  keys, spans, groups))

    @functools.cached_property
    def longest_token(self) -> int:
        """The most characters one token of the tokenizer stands for (at least 4: an unknown
        character may become one token). Looked up once per processor."""
        return max(4, max(map(len, self.tokenizer.get_vocab()), default=0))

    def _slot_ids(self) -> set[int]:
        """Token ids of visual slots: the image token, and the video token where the family has one."""
        tokens = [self.image_token] + ([self.video_token] if self.video_token else [])
        return {self.tokenizer.convert_tokens_to_ids(t) for t in tokens}

    def _check_image_tokens(self, sample_id: str, ids: list[int], layouts: list[TokenLayout]) -> None:
        slot_ids = self._slot_ids()
        got, want = sum(i in slot_ids for i in ids), sum(l.slots for l in layouts)
        if got != want:
            raise BadRecordError(sample_id, f"tokenised to {got} image tokens, expected {want}")
