"""`vlmkit chat` without a question: one model, a conversation that keeps its turns and images."""

from __future__ import annotations

import pytest
from PIL import Image

from tests._tiny import tiny_model
from vlmkit.chat import ChatSession
from vlmkit.data.formats import Message
from vlmkit.generate import GenerationConfig, decode, generate
from vlmkit.processing import build_chat_processor


@pytest.fixture()
def session(tmp_path):
    model = tiny_model("mlp").eval()
    Image.new("RGB", (40, 30), (200, 20, 20)).save(tmp_path / "a.png")
    return ChatSession(model, build_chat_processor(model, 512), GenerationConfig(max_new_tokens=4)), tmp_path / "a.png"


def test_turns_build_on_each_other(session):
    chat, image = session
    chat.attach(image)
    first = chat.ask("What is this?")
    second = chat.ask("And its colour?")
    assert [m.role for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[0].content == "<image>\nWhat is this?" and chat.messages[1].content == first
    assert chat.images == [image] and chat.pending == []
    # The second answer is the model's answer to the whole conversation, image included.
    proc, model = chat.processor, chat.model
    prompt = proc.encode_prompt([Message("user", "<image>\nWhat is this?"), Message("assistant", first),
                                 Message("user", "And its colour?")], [image])
    assert second == decode(model, generate(model, [prompt], chat.gen))[0]


def test_a_turn_that_cannot_be_encoded_is_dropped_and_the_conversation_kept(session, tmp_path):
    chat, image = session
    chat.attach(image)
    chat.ask("What is this?")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    chat.attach(tmp_path / "broken.png")
    with pytest.raises(ValueError, match="broken.png"):
        chat.ask("And this one?")
    assert len(chat.messages) == 2 and chat.images == [image] and chat.pending == []
    with pytest.raises(FileNotFoundError, match="no such image file"):
        chat.attach(tmp_path / "nope.png")
    chat.reset()
    assert chat.messages == [] and chat.images == []
