"""`chat` and `serve` answer in the precision the checkpoint trained in (`train.precision`), as
`eval run` does: bf16 autocast around generation, entered in the thread that generates."""

from __future__ import annotations

import asyncio
import threading

import torch
from _tiny import tiny_model

from vlmkit.chat import ChatSession
from vlmkit.core.types import Message
from vlmkit.generate import GenerationConfig
from vlmkit.processing import build_chat_processor
from vlmkit.serve import batching


def _spy(record):
    def spy(*args, **kwargs):
        record.append((threading.current_thread().name, torch.is_autocast_enabled("cpu"),
                       torch.get_autocast_dtype("cpu")))
        raise RuntimeError("stop here")
    return spy


def test_chat_session_answers_under_bf16_autocast_when_the_checkpoint_trained_in_bf16(monkeypatch):
    model = tiny_model("mlp")
    processor = build_chat_processor(model, 256)
    seen = []
    monkeypatch.setattr("vlmkit.chat.generate", _spy(seen))
    for bf16 in (True, False):
        session = ChatSession(model, processor, GenerationConfig(max_new_tokens=2), bf16=bf16)
        try:
            session.ask("Hello")
        except RuntimeError:
            pass
    assert [(on, dtype) for _, on, dtype in seen] == [(True, torch.bfloat16), (False, torch.bfloat16)]


def test_server_batcher_decodes_under_bf16_autocast_in_its_worker_thread(monkeypatch):
    model = tiny_model("mlp")
    prompt = build_chat_processor(model, 256).encode_prompt([Message("user", "Hi")], [])
    for bf16 in (True, False):
        seen = []
        monkeypatch.setattr(batching, "generate_steps", _spy(seen))
        batcher = batching.DynamicBatcher(model, max_batch=2, max_wait_s=0.0, bf16=bf16)

        async def ask():
            job = batching.Job(prompt, GenerationConfig(max_new_tokens=2), 2, asyncio.get_running_loop())
            batcher.submit(job)
            return await asyncio.wait_for(job.events.get(), timeout=30)

        batcher.start()
        try:
            event = asyncio.run(ask())
        finally:
            batcher.stop()
        assert seen == [("vlmkit-batcher", bf16, torch.bfloat16)]
        assert event.kind == "error"  # the spy's failure answers the batch; the worker goes on
