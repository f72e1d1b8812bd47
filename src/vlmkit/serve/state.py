"""The server's settings, and the parts every request shares (app.state.server)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from vlmkit.processing.images import image_formats
from vlmkit.serve import engine
from vlmkit.serve.batching import DynamicBatcher
from vlmkit.serve.caches import FeatureCache, PrefixCache, weights_key

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass
class ServerSettings:
    model_name: str = "vlmkit"
    api_key: str | None = None
    allow_remote_images: bool = False
    max_request_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 16_000_000
    max_images: int = 8
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_queue: int = 1024
    remote_timeout_s: float = 10.0
    # Seconds a client has to send the whole request body once its headers arrived; a body left
    # unfinished gets a 408 and the connection is closed.
    body_timeout_s: float = 30.0
    # Compile the decode step (GenerationConfig.compile): a CUDA graph per power-of-two batch size.
    compile_decode: bool = False
    # Decode under bf16 autocast: the precision the checkpoint trained in (`train.precision`).
    bf16: bool = False
    # Pillow formats a request's images may be in (None: images.DEFAULT_IMAGE_FORMATS).
    image_formats: list[str] | None = None
    # Threads that decode request images, off the event loop.
    decode_workers: int = 2
    # Without an API key: Host names (no port) and browser Origins that may reach the server;
    # "*" allows any. The loopback names are always allowed hosts.
    allowed_hosts: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=list)
    # "continuous": requests join and leave the running batch between decoding steps;
    # "static": a batch forms, decodes to its end, then the next forms (the earlier server).
    # Models the continuous engine cannot run (serve/engine.py: `supports`) are served static.
    batching: str = "continuous"
    # Megabytes for the image-feature cache and the prompt-prefix cache (0 turns one off); both
    # need continuous batching.
    feature_cache_mb: float = 256.0
    prefix_cache_mb: float = 256.0


BATCHING_MODES = ("continuous", "static")


def build_batcher(model, settings: ServerSettings):
    """The generation worker the settings ask for (see `ServerSettings.batching`)."""
    if settings.batching not in BATCHING_MODES:
        raise ValueError(f"batching must be one of {', '.join(BATCHING_MODES)}, not {settings.batching!r}")
    if settings.batching == "continuous" and engine.supports(model):
        caching = settings.feature_cache_mb > 0 or settings.prefix_cache_mb > 0
        # The caches' entries are keyed by these weights: another checkpoint never reads them.
        weights = weights_key(model) if caching else ""
        return engine.ContinuousBatcher(
            model, max_batch=settings.max_batch, max_queue=settings.max_queue, bf16=settings.bf16,
            feature_cache=FeatureCache(int(settings.feature_cache_mb * 2**20), weights),
            prefix_cache=PrefixCache(int(settings.prefix_cache_mb * 2**20), weights))
    return DynamicBatcher(model, max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1000,
                          max_queue=settings.max_queue, bf16=settings.bf16)


@dataclass
class ServerState:
    settings: ServerSettings
    model: Any
    processor: Any
    batcher: DynamicBatcher | engine.ContinuousBatcher
    # One thread encodes prompts: fast tokenizers are not safe to share across threads.
    encoder: ThreadPoolExecutor
    # Images decode on their own threads: a large image must not stall /health or other requests.
    decoder: ThreadPoolExecutor
    image_formats: tuple[str, ...]
    allowed_hosts: set[str]
    allowed_origins: set[str]

    @classmethod
    def build(cls, model, processor, settings: ServerSettings) -> ServerState:
        return cls(
            settings=settings,
            model=model,
            processor=processor,
            batcher=build_batcher(model, settings),
            encoder=ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmkit-encode"),
            decoder=ThreadPoolExecutor(max_workers=max(1, settings.decode_workers), thread_name_prefix="vlmkit-decode"),
            image_formats=image_formats(settings.image_formats),
            allowed_hosts={h.lower().strip("[]") for h in (*LOOPBACK_HOSTS, *settings.allowed_hosts)},
            allowed_origins={o.lower().rstrip("/") for o in settings.allowed_origins},
        )

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def image_token(self) -> str:
        return self.model.config.image_token

    def start(self) -> None:
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()
        self.encoder.shutdown(wait=False, cancel_futures=True)
        self.decoder.shutdown(wait=False, cancel_futures=True)


async def server_state(request: Request) -> ServerState:
    """The dependency that hands a route the state `create_app` built."""
    return request.app.state.server
