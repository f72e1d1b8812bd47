"""A multi-turn conversation with a loaded model: what `vlmkit chat` runs without a question.

The model is loaded once; every turn re-encodes the whole conversation (images included) with
the chat processor, so the model sees the same prompt layout it was trained on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.data.formats import BadRecordError, Message
from vlmkit.generate import GenerationConfig, decode, generate

HELP = "/image PATH attaches an image to your next message, /reset starts over, /quit (or Ctrl-D) ends."


class ChatSession:
    def __init__(self, model, processor, gen: GenerationConfig, bf16: bool = False):
        self.model, self.processor, self.gen = model, processor, gen
        # Answer under bf16 autocast when the checkpoint trained in bf16 (`train.precision`).
        self.bf16 = bf16
        self.messages: list[Message] = []
        self.images: list[Path] = []  # every image of the conversation, in placeholder order
        self.pending: list[Path] = []  # attached, waiting for the next message

    def attach(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no such image file: {path.resolve()}")
        self.pending.append(path)
        return path

    def reset(self) -> None:
        self.messages, self.images, self.pending = [], [], []

    def ask(self, text: str) -> str:
        """The model's answer. A turn that cannot be encoded (too long, an unreadable image) raises
        BadRecordError; it is dropped with its images, and the conversation so far is kept."""
        images = self.pending
        if images and "<image>" not in text:
            text = self.processor.with_leading_images(text, len(images))
        messages = [*self.messages, Message("user", text)]
        try:
            prompt = self.processor.encode_prompt(messages, [*self.images, *images])
        except BadRecordError:
            self.pending = []
            raise
        with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            ids = generate(self.model, [prompt], self.gen)
        answer = decode(self.model, ids)[0]
        self.messages = [*messages, Message("assistant", answer)]
        self.images = [*self.images, *images]
        self.pending = []
        return answer
