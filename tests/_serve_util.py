"""A tiny VLM behind a real uvicorn server on a loopback port, for the serving tests."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time
from contextlib import contextmanager

import torch
from PIL import Image

from vlmkit.config import load_config
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.processing import build_chat_processor

TINY = {
    "model": {
        "vision": {"name": "hf-random", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}},
        "llm": {"name": "hf-random", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 1024}},
        "processor": {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }
}


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = load_config(TINY)
    model = VisionLanguageModel.build(cfg.model, pretrained=False).eval()
    # A random LM's logits are nearly flat, so its greedy choice can hinge on the last bit of a
    # float; batches of different sizes use different matmul kernels, and the load test compares
    # a batched answer with a one-by-one answer. Sharper logits make argmax a property of the
    # model, not of the kernel.
    with torch.no_grad():
        model.llm.get_output_embeddings().weight.mul_(8)
    return model, build_chat_processor(model, 512)


def png_data_uri(color=(200, 30, 30), size=(40, 24)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@contextmanager
def running_server(app):
    """uvicorn in a thread, on a socket bound before it starts (no free-port race)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def request(base: str, method: str, path: str, body: bytes | str | dict | None = None, headers: dict | None = None, timeout: float = 30):
    """Raw HTTP, so malformed bodies reach the server exactly as written."""
    host = base.split("//", 1)[1]
    conn = http.client.HTTPConnection(host, timeout=timeout)
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = raw.decode("utf-8", "replace")
    return resp.status, payload, dict(resp.getheaders())
