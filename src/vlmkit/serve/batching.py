"""Dynamic batching: concurrent requests share one generation batch.

The event loop only validates and enqueues; one worker thread owns the model. It takes the
oldest waiting request, waits up to `max_wait_s` for others that can share its batch (same
sampling settings; greedy requests all share), and decodes them together with
`generate_steps`, each row with its own token limit. Tokens go back to each request's asyncio
queue through `call_soon_threadsafe`, so streaming clients see them as they are produced.

Requests that arrive while a batch is decoding wait for the next batch; batched greedy output
equals one-by-one output (left padding + per-row positions), so batching never changes an
answer, only when it arrives.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmkit.generate import GenerationConfig, generate_steps
from vlmkit.processing.prompt import EncodedSample

log = logging.getLogger("vlmkit.serve")


@dataclass
class Event:
    kind: str  # "token" | "done" | "error"
    token: int | None = None
    reason: str | None = None  # finish reason for "done", message for "error"


@dataclass
class Job:
    prompt: EncodedSample
    gen: GenerationConfig
    max_new_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    enqueued_at: float = field(default_factory=time.monotonic)

    def key(self) -> tuple[Any, ...]:
        """Requests that may share a batch: all greedy ones; sampled ones with equal settings.
        A seeded sampled request runs alone, so its seed reproduces its answer."""
        g = self.gen
        if not g.do_sample:
            return ("greedy",)
        if g.seed is not None:
            return ("seeded", id(self))
        return ("sample", g.temperature, g.top_p, g.top_k)

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancelled = True


class QueueFull(Exception):
    pass


class GenerationWorker:
    """A queue of requests and the one thread that answers them; subclasses define `_run` (how
    requests are batched and decoded) and set `_queue`, `_stopping`, `_thread`, `error`,
    `max_queue` and `stats` in their constructor."""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vlmkit-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        if not self.healthy:
            raise RuntimeError("the generation worker is not running")
        if self.waiting >= self.max_queue:
            raise QueueFull(f"{self.waiting} requests are already waiting")
        self.stats["requests"] += 1
        self._queue.put(job)

    def _run(self) -> None:
        raise NotImplementedError

    def _refuse_queued(self) -> None:
        """Nobody will serve what is still queued when the worker ends: answer it instead of
        leaving it hanging."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit(Event("error", reason="the server is shutting down"))


class DynamicBatcher(GenerationWorker):
    def __init__(self, model, max_batch: int = 32, max_wait_s: float = 0.01, max_queue: int = 1024, bf16: bool = False):
        # Decode under bf16 autocast when the checkpoint trained in bf16. Autocast is per thread:
        # it is entered in the worker thread, around the whole decode of a batch.
        self.bf16 = bf16
        self.model = model
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: list[Job] = []  # taken from the queue but not yet batched (other settings)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.error: BaseException | None = None
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "tokens": 0}

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._held)

    # ---- worker ---------------------------------------------------------------------------
    def _next_batch(self) -> list[Job]:
        if self._held:
            first = self._held.pop(0)
        else:
            first = self._queue.get()
            if first is None:
                return []
        batch = [first]
        key = first.key()
        rest = [j for j in self._held if j.key() == key]
        for j in rest[: self.max_batch - 1]:
            self._held.remove(j)
            batch.append(j)
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            timeout = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._stopping.set()
                break
            if job.key() == key:
                batch.append(job)
            else:
                self._held.append(job)
        return [j for j in batch if not j.cancelled]

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                batch = self._next_batch()
                if batch:
                    self._decode(batch)
        except BaseException as e:  # the worker must never die silently: /health reports it
            log.exception("generation worker stopped")
            self.error = e
            for job in self._held:
                job.emit(Event("error", reason="the generation worker stopped"))
        finally:
            self._refuse_queued()

    def _emit_steps(self, batch: list[Job]) -> None:
        steps = generate_steps(
            self.model,
            [j.prompt for j in batch],
            batch[0].gen,
            max_new_tokens=[j.max_new_tokens for j in batch],
            cancelled=lambda i: batch[i].cancelled,
        )
        for step in steps:
            for job, token, finished in zip(batch, step.tokens, step.finished):
                if token is not None:
                    self.stats["tokens"] += 1
                    job.emit(Event("token", token=token))
                if finished is not None:
                    job.emit(Event("done", reason=finished))

    def _decode(self, batch: list[Job]) -> None:
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        try:
            with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                self._emit_steps(batch)
        except Exception as e:
            # A failure inside one batch (out of memory, a bad input that got through) answers
            # that batch with an error; the worker goes on serving.
            log.exception("generation failed for a batch of %d", len(batch))
            for job in batch:
                job.emit(Event("error", reason=f"generation failed: {type(e).__name__}: {e}"))
            return
        for job in batch:
            # Rows cut off by cancellation never got a "done"; closing them is harmless.
            job.emit(Event("done", reason="cancelled" if job.cancelled else "stop"))
