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

from dataclasses import dataclass, field

import torch

from vlmkit.data.formats import BadRecordError, Message, Sample
from vlmkit.model.vlm import IGNORE_INDEX
from vlmkit.processing.base import ImageProcessor, TokenLayout
from vlmkit.processing.images import ImageLoadError, load_image

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class EncodedSample:
    id: str
    input_ids: torch.Tensor  # (T,)
    labels: torch.Tensor  # (T,), IGNORE_INDEX outside assistant spans
    pixel_values: torch.Tensor  # (images, 3, H, W); (0, ...) when text-only
    layouts: list[TokenLayout] = field(default_factory=list)
    image_keys: list[str] = field(default_factory=list)  # for caching frozen-tower features


def _as_dicts(messages: list[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


class ChatProcessor:
    """Turns `Sample`s into token ids, labels and pixels for one model."""

    def __init__(self, tokenizer, image_processor: ImageProcessor, image_token: str, max_length: int, max_image_pixels: int = 64_000_000):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token
        self.max_length = max_length
        self.max_image_pixels = max_image_pixels
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("ChatProcessor needs a fast tokenizer (character offsets map spans to labels)")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template")

    # ---- images -------------------------------------------------------------------------
    def load_images(self, sample: Sample):
        processed = []
        for path in sample.images:
            try:
                image = load_image(path, max_pixels=self.max_image_pixels)
            except (ImageLoadError, FileNotFoundError) as e:
                raise BadRecordError(sample.id, str(e)) from None
            processed.append(self.image_processor.preprocess(image))
        return processed

    def _expand_placeholders(self, sample: Sample, layouts: list[TokenLayout]) -> list[Message]:
        found = sum(m.content.count(IMAGE_PLACEHOLDER) for m in sample.messages)
        if found != len(layouts):
            raise BadRecordError(
                sample.id,
                f"has {len(layouts)} image(s) but {found} {IMAGE_PLACEHOLDER} placeholder(s); each image needs exactly one",
            )
        expanded, k = [], 0
        for m in sample.messages:
            pieces = m.content.split(IMAGE_PLACEHOLDER)
            text = pieces[0]
            for piece in pieces[1:]:
                text += self.image_processor.placeholder_text(layouts[k], self.image_token) + piece
                k += 1
            expanded.append(Message(m.role, text))
        return expanded

    # ---- text ---------------------------------------------------------------------------
    def _render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(_as_dicts(messages), tokenize=False, add_generation_prompt=add_generation_prompt)

    def assistant_spans(self, sample_id: str, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
        full = self._render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
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
        processed = self.load_images(sample)
        layouts = [p.layout for p in processed]
        messages = self._expand_placeholders(sample, layouts)
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
        pixels = torch.cat([p.pixel_values for p in processed]) if processed else torch.zeros(0)
        return EncodedSample(
            id=sample.id,
            input_ids=torch.tensor(ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            pixel_values=pixels,
            layouts=layouts,
            image_keys=[str(p) for p in sample.images],
        )

    def encode_prompt(self, messages: list[Message], images: list) -> EncodedSample:
        """A generation prompt: the conversation so far plus the assistant header."""
        sample = Sample(id="prompt", messages=messages, images=[])
        processed = []
        for image in images:
            try:
                processed.append(self.image_processor.preprocess(load_image(image, max_pixels=self.max_image_pixels)))
            except ImageLoadError as e:
                raise BadRecordError("prompt", str(e)) from None
        layouts = [p.layout for p in processed]
        expanded = self._expand_placeholders(sample, layouts)
        text = self._render(expanded, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_length:
            raise BadRecordError("prompt", f"is {len(ids)} tokens long, longer than the context of {self.max_length}")
        self._check_image_tokens("prompt", ids, layouts)
        pixels = torch.cat([p.pixel_values for p in processed]) if processed else torch.zeros(0)
        return EncodedSample("prompt", torch.tensor(ids), torch.full((len(ids),), IGNORE_INDEX), pixels, layouts)

    def _check_image_tokens(self, sample_id: str, ids: list[int], layouts: list[TokenLayout]) -> None:
        image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        got, want = ids.count(image_id), sum(l.visual_tokens for l in layouts)
        if got != want:
            raise BadRecordError(sample_id, f"tokenised to {got} image tokens, expected {want}")
