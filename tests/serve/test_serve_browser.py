"""The web page at /, driven in headless Chromium over the Chrome DevTools protocol.

A person picks an image file, types a question and presses Ask; the streamed answer must equal
what the API answers for the same image and question. Further questions continue the
conversation: each answer must equal the API's answer to the whole conversation so far.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
websocket = pytest.importorskip("websocket", reason="the browser test drives Chromium with websocket-client (pip install websocket-client)")

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("/usr/bin/chromium is missing (apt-get install chromium; .ci/run installs it)", allow_module_level=True)

from _serve_util import running_server, tiny_model  # noqa: E402
from PIL import Image  # noqa: E402

from vlmkit.serve.app import ServerSettings, create_app  # noqa: E402

KEY = "page-key"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--remote-debugging-port=0"]


class DevTools:
    """A minimal CDP session: numbered commands, events kept for inspection."""

    def __init__(self, ws_url: str):
        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        status = self.js("document.getElementById('status').textContent")
        raise TimeoutError(f"waited {timeout}s for {expression}; page status: {status!r}")

    def close(self):
        self.ws.close()


@pytest.fixture
def browser():
    profile = tempfile.mkdtemp(prefix="vlmkit-chromium-")
    proc = subprocess.Popen([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if proc.poll() is not None:
                pytest.fail(f"chromium exited: {proc.stderr.read().decode(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("chromium did not open its DevTools port within 30 s")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.loads(r.read())
        page = next(t for t in targets if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        yield tools
        tools.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


# Reads the page's status once a turn has ended ("Answered..." or "error: ..."), else "".
FINISHED = "(s => s.startsWith('Answered') || s.startsWith('error') ? s : '')(document.getElementById('status').textContent)"
LAST_ANSWER = "(t => t.length ? t[t.length - 1].textContent : null)(document.querySelectorAll('#conversation .turn.assistant'))"


def open_page(b, base: str, image_path: Path) -> None:
    b.send("Runtime.enable")
    b.send("Page.enable")
    b.send("Page.navigate", url=base + "/")
    b.wait_for("document.readyState === 'complete' && !!document.getElementById('ask')")
    assert b.js("document.getElementById('model').textContent") == "tiny"
    root = b.send("DOM.getDocument")["root"]["nodeId"]
    node = b.send("DOM.querySelector", nodeId=root, selector="#image")["nodeId"]
    b.send("DOM.setFileInputFiles", nodeId=node, files=[str(image_path)])
    b.wait_for("document.getElementById('status').textContent === 'image ready'")
    assert b.js("document.getElementById('preview').style.display") == "block"


def ask(b, question: str) -> str:
    b.js("document.getElementById('status').textContent = ''")
    b.js(f"document.getElementById('question').value = {json.dumps(question)}")
    b.js("document.getElementById('ask').click()")
    return b.wait_for(FINISHED)


def test_page_uploads_image_and_streams_answer(browser, tmp_path):
    model, processor = tiny_model()
    image_path = tmp_path / "blue.png"
    Image.new("RGB", (48, 32), (20, 40, 220)).save(image_path)
    app = create_app(model, processor, ServerSettings(model_name="tiny", api_key=KEY))
    with running_server(app) as base:
        import base64

        import openai

        uri = "data:image/png;base64," + base64.b64encode(image_path.read_bytes()).decode()
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        expected = client.chat.completions.create(
            model="tiny", max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "What colour is it?"}]}],
        ).choices[0].message.content

        b = browser
        open_page(b, base, image_path)
        b.js("document.getElementById('max-tokens').value = '8'")
        # Without the key the page shows the server's error instead of an answer, and the failed
        # turn leaves nothing in the conversation.
        status = ask(b, "What colour is it?")
        assert status.startswith("error") and "API key" in status
        assert b.js("document.querySelectorAll('#conversation .turn').length") == 0
        assert b.js("document.getElementById('question').value") == "What colour is it?"

        b.js(f"document.getElementById('api-key').value = {json.dumps(KEY)}")
        status = ask(b, "What colour is it?")
        # Plain words: the 8-token limit cut the answer short, or the model stopped by itself.
        assert status in ("Answered.", "Answered, cut off at the token limit (raise Max tokens for longer answers)."), status
        assert b.js(LAST_ANSWER) == expected

    exceptions = [e for e in b.events if e.get("method") == "Runtime.exceptionThrown"]
    assert not exceptions, exceptions


def test_page_holds_a_conversation_about_one_image(browser, tmp_path):
    model, processor = tiny_model()
    image_path = tmp_path / "red.png"
    Image.new("RGB", (40, 40), (220, 30, 30)).save(image_path)
    app = create_app(model, processor, ServerSettings(model_name="tiny"))
    with running_server(app) as base:
        import base64

        import openai

        uri = "data:image/png;base64," + base64.b64encode(image_path.read_bytes()).decode()
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        questions = ["What is this?", "What colour is it?", "Is it round?"]
        messages, expected = [], []
        for k, q in enumerate(questions):
            content = ([{"type": "image_url", "image_url": {"url": uri}}] if k == 0 else []) + [{"type": "text", "text": q}]
            messages.append({"role": "user", "content": content})
            answer = client.chat.completions.create(model="tiny", max_tokens=6, temperature=0, messages=messages).choices[0].message.content
            messages.append({"role": "assistant", "content": answer})
            expected.append(answer)

        b = browser
        open_page(b, base, image_path)
        # Inputs in normal weight (labels bold), and the inputs of a row on one line however long
        # each label is.
        assert b.js("getComputedStyle(document.getElementById('question')).fontWeight") == "400"
        assert b.js("getComputedStyle(document.querySelector('.label')).fontWeight") == "600"
        tops = b.js("[...document.querySelectorAll('.row input')].map(i => Math.round(i.getBoundingClientRect().top))")
        assert len(tops) == 3 and len(set(tops)) == 1, tops
        b.js("document.getElementById('max-tokens').value = '6'")
        for k, q in enumerate(questions):
            assert ask(b, q).startswith("Answered"), b.js("document.getElementById('status').textContent")
            assert b.js(LAST_ANSWER) == expected[k], f"turn {k + 1}"
            # The image went with the first question and stays in the conversation, not in the picker.
            assert b.js("document.getElementById('preview').style.display") == "none"
        turns = b.js("[...document.querySelectorAll('#conversation .turn')].map(t => t.className + ':' + t.textContent)")
        assert turns == [f"turn {role}:{text}" for q, a in zip(questions, expected) for role, text in (("user", q), ("assistant", a))]
        assert b.js("document.querySelectorAll('#conversation .turn.user img').length") == 1

        b.js("document.getElementById('new').click()")
        assert b.js("document.querySelectorAll('#conversation .turn').length") == 0
        # A fresh conversation: the same question without the image gets the text-only answer.
        alone = client.chat.completions.create(model="tiny", max_tokens=6, temperature=0,
                                               messages=[{"role": "user", "content": "Is it round?"}]).choices[0].message.content
        assert ask(b, "Is it round?").startswith("Answered")
        assert b.js(LAST_ANSWER) == alone

    exceptions = [e for e in b.events if e.get("method") == "Runtime.exceptionThrown"]
    assert not exceptions, exceptions
