"""Models behind one interface: a batch of (prompt, images) in, one answer string per item out.

`BACKENDS` maps a spec prefix to a factory; `make_backend("hf:/models/foo")` builds one.
A vlmkit-checkpoint backend registers itself here under "vlmkit" (see `register_backend`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from PIL import Image

from vlmkit.checkpoint import load_checkpoint
from vlmkit.data.formats import Message
from vlmkit.eval.benchmarks.base import EvalInputError
from vlmkit.generate import GenerationConfig, decode, generate
from vlmkit.hf.registry import SUPPORTED
from vlmkit.processing import build_chat_processor

# A prompt is one user turn's text, or a conversation so far (`Message`s, a system turn or
# earlier exchanges included) whose text places the images with `<image>` placeholders.
Request = tuple[str | list[Message], list[Image.Image]]


def chat_turns(prompt: str | list[Message], n_images: int) -> list[tuple[str, list[tuple[str, str]]]]:
    """(role, parts) per turn, parts being ("text", TEXT) or ("image", ""): a string prompt is one
    user turn with every image before its text; a conversation's images go where its `<image>`
    placeholders are, or before the first user turn's text when it has none."""
    if isinstance(prompt, str):
        return [("user", [("image", "")] * n_images + [("text", prompt)])]
    placed = any("<image>" in m.content for m in prompt)
    first_user = next((i for i, m in enumerate(prompt) if m.role == "user"), 0)
    turns = []
    for i, m in enumerate(prompt):
        parts: list[tuple[str, str]] = [("image", "")] * n_images if not placed and i == first_user else []
        for k, piece in enumerate(m.content.split("<image>")):
            if k:
                parts.append(("image", ""))
            if piece.strip():
                parts.append(("text", piece))
        turns.append((m.role, parts))
    return turns


@runtime_checkable
class Backend(Protocol):
    name: str

    def generate(self, batch: Sequence[Request], max_new_tokens: int) -> list[str]:
        """Greedy answers, one per request, in order."""
        ...


BackendFactory = Callable[..., Backend]
BACKENDS: dict[str, BackendFactory] = {}


def register_backend(name: str) -> Callable[[BackendFactory], BackendFactory]:
    """Add a backend kind. Factories take the spec's target (after "name:") plus keyword options."""

    def add(factory: BackendFactory) -> BackendFactory:
        BACKENDS[name] = factory
        return factory

    return add


def make_backend(spec: str, **options: Any) -> Backend:
    """`hf:/path/to/folder`, `openai:MODEL` (with base_url=...), `vlmkit:/path/to/checkpoint`.

    A bare existing folder with a config.json is taken as a Hugging Face model folder.
    """
    kind, sep, target = spec.partition(":")
    if not sep or kind not in BACKENDS:
        if Path(spec).is_dir() and (Path(spec) / "config.json").is_file() and "hf" in BACKENDS:
            kind, target = "hf", spec
        else:
            known = ", ".join(f"{k}:..." for k in sorted(BACKENDS)) or "(none)"
            raise EvalInputError(f"unknown model spec {spec!r}; known kinds: {known}")
    return BACKENDS[kind](target, **options)


def image_to_data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible chat endpoint
# ---------------------------------------------------------------------------------------------


class OpenAIChatBackend:
    """Any `/v1/chat/completions` server (vLLM, SGLang, vlmkit serve, OpenAI).

    Uses the official `openai` client when it is installed, otherwise a plain HTTP POST with
    the standard library, so the backend works without extra dependencies. Requests of a
    batch are sent concurrently; images travel as PNG data URIs before the text part.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 120.0,
        temperature: float = 0.0,
        client: str = "auto",
    ):
        self.model = model
        self.name = f"openai:{model}"
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "http://localhost:8000/v1").rstrip("/")
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.temperature = temperature
        self._client = None
        if client in ("auto", "openai"):
            try:
                import openai
            except ImportError:
                if client == "openai":
                    raise EvalInputError("the openai package is not installed (pip install openai)") from None
            else:
                self._client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=timeout, max_retries=2)

    def _messages(self, prompt: str | list[Message], images: list[Image.Image]) -> list[dict[str, Any]]:
        pending = iter(images)
        return [{"role": role, "content": [{"type": "text", "text": text} if kind == "text" else
                                           {"type": "image_url", "image_url": {"url": image_to_data_uri(next(pending))}}
                                           for kind, text in parts]}
                for role, parts in chat_turns(prompt, len(images))]

    def _one(self, req: Request, max_new_tokens: int) -> str:
        messages = self._messages(*req)
        if self._client is not None:
            resp = self._client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=max_new_tokens, temperature=self.temperature
            )
            return resp.choices[0].message.content or ""
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_new_tokens,
                           "temperature": self.temperature}).encode()
        http = urllib.request.Request(
            self.base_url + "/chat/completions", data=body, method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"},
        )
        try:
            with urllib.request.urlopen(http, timeout=self.timeout) as r:
                payload = json.loads(r.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300]
            raise RuntimeError(f"{self.base_url}/chat/completions answered {e.code}: {detail}") from None
        return payload["choices"][0]["message"].get("content") or ""

    def generate(self, batch: Sequence[Request], max_new_tokens: int) -> list[str]:
        if len(batch) <= 1 or self.concurrency == 1:
            return [self._one(r, max_new_tokens) for r in batch]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(batch))) as pool:
            return list(pool.map(lambda r: self._one(r, max_new_tokens), batch))


@register_backend("openai")
def _openai_factory(target: str, **options: Any) -> Backend:
    return OpenAIChatBackend(target, **{k: v for k, v in options.items() if v is not None and k in
                                        ("base_url", "api_key", "concurrency", "timeout", "temperature", "client")})


# ---------------------------------------------------------------------------------------------
# Hugging Face VLM folder
# ---------------------------------------------------------------------------------------------


class HFBackend:
    """A local Hugging Face VLM folder: `AutoModelForImageTextToText` + `AutoProcessor`.

    Offline only (HF_HUB_OFFLINE=1, local_files_only): evaluation never downloads weights.
    Batches are left-padded so every row's new tokens start at the same column.
    """

    def __init__(self, path: str, device: str | None = None, dtype: str = "auto"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not Path(path).is_dir():
            raise EvalInputError(f"{path}: Hugging Face model folder not found")
        self.name = f"hf:{path}"
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise EvalInputError(f"unknown dtype {dtype!r} (auto, float32, bfloat16, float16)")
        torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
        try:
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
        except Exception as e:  # noqa: BLE001 - a missing optional dependency, a bad config, missing weights ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise EvalInputError(f"{path}: transformers cannot load this model folder ({type(e).__name__}: {first[:400]})"
                                 + _import_hint(path)) from e
        self.model.to(self.device).eval()
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token

    def _text(self, prompt: str | list[Message], n_images: int) -> str:
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": role, "content": [{"type": "text", "text": text} if kind == "text" else {"type": "image"}
                                                   for kind, text in parts]}
                        for role, parts in chat_turns(prompt, n_images)]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        token = getattr(self.processor, "image_token", "<image>")
        if not isinstance(prompt, str):  # no chat template: the turns' text, images in place
            return "\n".join("".join(token if kind == "image" else text for kind, text in parts)
                             for _, parts in chat_turns(prompt, n_images))
        return token * n_images + "\n" + prompt

    def generate(self, batch: Sequence[Request], max_new_tokens: int) -> list[str]:
        import torch

        texts = [self._text(p, len(ims)) for p, ims in batch]
        images = [ims for _, ims in batch]
        kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
        if any(images):
            kwargs["images"] = images
        inputs = self.processor(**kwargs).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        # Raw text: the runner strips every backend's answers alike.
        return list(self.processor.batch_decode(new_tokens, skip_special_tokens=True))


def _import_hint(path: str) -> str:
    """For a family vlmkit imports (Qwen2-VL's HF processor, for one, needs torchvision), how
    to evaluate it through vlmkit's own processors instead."""
    import json

    try:
        model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return ""
    if model_type not in SUPPORTED:
        return ""
    return (f"; vlmkit can run it without transformers' processor: `vlmkit import-hf {path} OUT`, "
            "then `-m vlmkit:OUT`")


@register_backend("hf")
def _hf_factory(target: str, **options: Any) -> Backend:
    return HFBackend(target, **{k: v for k, v in options.items() if v is not None and k in ("device", "dtype")})


# ---------------------------------------------------------------------------------------------
# vlmkit checkpoint
# ---------------------------------------------------------------------------------------------


class VlmkitBackend:
    """A vlmkit model (a checkpoint folder, or a model already in memory): batched, left-padded
    greedy generation with a KV cache. Each image gets an `<image>` placeholder before the
    prompt unless the prompt already places them."""

    def __init__(self, model, max_length: int | None = None, name: str = "vlmkit", compile_decode: bool = False,
                 bf16: bool = False):
        self.model = model
        self.name = name
        # Autocast to bfloat16, as a model trained with `precision: bf16` ran in training.
        self.bf16 = bf16
        # Batches of one size, many times over: the case where compiling the decode step pays.
        self.compile_decode = compile_decode
        self.processor = build_chat_processor(model, max_length or 4096)

    @classmethod
    def from_checkpoint(cls, path: str, device: str | None = None, compile_decode: bool = False) -> "VlmkitBackend":
        import torch

        if not Path(path).is_dir():
            raise EvalInputError(f"{path}: vlmkit checkpoint folder not found")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            model, config = load_checkpoint(path, device=device)
        except Exception as e:  # noqa: BLE001 - not a checkpoint, a torn one, weights of another model ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise EvalInputError(f"{path}: cannot load this vlmkit checkpoint ({type(e).__name__}: {first[:400]})") from e
        # Answer in the precision the model trained in, as the quickstart and held-out checks do.
        return cls(model, config.train.max_length, name=f"vlmkit:{path}", compile_decode=compile_decode,
                   bf16=config.train.precision == "bf16")

    def encode(self, prompt: str | list[Message], images: Sequence[Image.Image]):
        if not isinstance(prompt, str):
            messages = list(prompt)
            if images and not any("<image>" in m.content for m in messages):
                first = next((i for i, m in enumerate(messages) if m.role == "user"), 0)
                messages[first] = Message(messages[first].role, self.processor.with_leading_images(messages[first].content, len(images)))
            return self.processor.encode_prompt(messages, list(images))
        text = prompt if "<image>" in prompt or not images else self.processor.with_leading_images(prompt, len(images))
        return self.processor.encode_prompt([Message("user", text)], list(images))

    def generate(self, batch: Sequence[Request], max_new_tokens: int) -> list[str]:
        import torch

        prompts = [self.encode(p, ims) for p, ims in batch]
        with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            ids = generate(self.model, prompts, GenerationConfig(max_new_tokens=max_new_tokens, compile=self.compile_decode))
        return decode(self.model, ids)


@register_backend("vlmkit")
def _vlmkit_factory(target: str, **options: Any) -> Backend:
    return VlmkitBackend.from_checkpoint(target, device=options.get("device"), compile_decode=bool(options.get("compile_decode")))
