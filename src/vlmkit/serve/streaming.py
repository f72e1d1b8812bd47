"""A job's tokens as an answer: text deltas, server-sent-event chunks, or one whole reply."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator

from vlmkit.serve.batching import Job
from vlmkit.serve.errors import APIError, error_body


class TextAssembler:
    """Token ids -> text deltas for streaming.

    Decoding the whole answer each time (not token by token) keeps multi-token characters and
    tokenizer spacing right; a delta ending in U+FFFD is an incomplete UTF-8 sequence and is
    held back, and so is any tail that could be the start of a stop string.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.sent = 0
        self.stopped = False

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.tokens.append(token)
        return self._release(final=False)

    def finish(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self.text()
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            end = cut
        elif final:
            end = len(text)
        else:
            end = len(text)
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
            for s in self.stop:
                for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if text[:end].endswith(s[:k]):
                        end -= k
                        break
        end = max(end, self.sent)
        delta = text[self.sent : end]
        self.sent = end
        return delta


@dataclass
class Completion:
    """What every chunk and the final reply of one completion repeat."""

    id: str
    created: int
    model: str
    prompt_tokens: int

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def reply(self, text: str, reason: str, completion_tokens: int) -> dict:
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": None}],
            "usage": self.usage(completion_tokens),
        }

    def chunk(self, delta: dict, reason: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                                "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}] if choices else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"


async def collect(job: Job, assembler: TextAssembler) -> tuple[str, str, int]:
    """The whole answer: its text, finish reason and token count."""
    parts, count = [], 0
    try:
        while True:
            event = await job.events.get()
            if event.kind == "token":
                count += 1
                parts.append(assembler.add(event.token))
                if assembler.stopped:
                    job.cancelled = True
                    return "".join(parts), "stop", count
            elif event.kind == "done":
                parts.append(assembler.finish())
                return "".join(parts), event.reason or "stop", count
            else:
                raise APIError(500, event.reason or "generation failed", code="generation_failed", kind="server_error")
    except asyncio.CancelledError:
        job.cancelled = True
        raise


async def stream_events(job: Job, assembler: TextAssembler, completion: Completion, include_usage: bool) -> AsyncIterator[str]:
    """The answer as server-sent events, OpenAI's chunk format, ending in `data: [DONE]`."""
    count = 0
    try:
        yield completion.chunk({"role": "assistant", "content": ""})
        reason = "stop"
        while True:
            event = await job.events.get()
            if event.kind == "token":
                count += 1
                delta = assembler.add(event.token)
                if delta:
                    yield completion.chunk({"content": delta})
                if assembler.stopped:
                    job.cancelled = True
                    break
            elif event.kind == "done":
                reason = event.reason or "stop"
                tail = assembler.finish()
                if tail:
                    yield completion.chunk({"content": tail})
                break
            else:
                # Headers are already sent: the error travels in the stream, as OpenAI does.
                yield f"data: {json.dumps(error_body(event.reason or 'generation failed', 'server_error'))}\n\n"
                return
        yield completion.chunk({}, reason)
        if include_usage:
            yield completion.chunk({}, usage=completion.usage(count), choices=False)
        yield "data: [DONE]\n\n"
    finally:
        # Also reached when the client disconnects mid-stream: free its batch row.
        job.cancelled = True
