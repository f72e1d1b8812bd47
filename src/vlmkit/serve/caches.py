"""The server's two caches, each bounded in bytes and evicting the least recently used entry.

* `FeatureCache`: the connector's output (the visual tokens the LLM reads) per image. Its key is
  a digest of what reaches the tower, the processed pixels with every view's grid, role and
  pooling, the arrangement and the original size, so any processor setting that changes what
  the model sees changes the key; plus the weights' identity (`weights_key`). The same picture
  sent again, by another client or in a later turn, skips the tower and the connector.
* `PrefixCache`: the decoder's keys and values of prompt prefixes. Prompts are cut into blocks of
  `BLOCK` tokens and each block boundary gets a chained digest of the tokens before it, of the
  images whose slots begin before it, and of the weights; a prompt reuses the longest prefix whose
  digest is cached (a shared system turn and image are computed once) and computes the rest.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import torch

BLOCK = 16


class ByteLRU:
    """A mapping bounded by the summed sizes of its values; the least recently used go first.
    A value larger than the whole budget is not kept. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key, value, size: int) -> None:
        with self._lock:
            if key in self._items:
                self.bytes -= self._items.pop(key)[1]
            if size > self.max_bytes:
                return
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict:
        return {"entries": len(self._items), "bytes": self.bytes, "hits": self.hits, "misses": self.misses}


def _digest(h, t: torch.Tensor) -> None:
    """Feed a tensor's bytes to the hash `h` (no copy for a contiguous CPU tensor)."""
    t = t.detach()
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        # A tensor subclass (torchao's quantized weights): the tensors it is made of.
        h.update(type(t).__name__.encode())
        for name in t.__tensor_flatten__()[0]:
            _digest(h, getattr(t, name))
        return
    t = t.to("cpu").contiguous().reshape(-1)
    if t.numel():
        h.update(t.view(torch.uint8).numpy())


def weights_key(*modules: torch.nn.Module) -> str:
    """A digest of the modules' parameters and buffers (names, dtypes, shapes, values): the identity
    of a set of weights, whatever file they came from."""
    h = hashlib.blake2b(digest_size=16)
    for module in modules:
        for name, t in (*module.named_parameters(), *module.named_buffers()):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            _digest(h, t)
    return h.hexdigest()


def image_key(image, weights: str) -> str:
    """A processed image's identity as the model sees it: pixels, views, arrangement, size."""
    h = hashlib.blake2b(digest_size=16)
    h.update(weights.encode())
    h.update(repr((image.views, image.arrangement, image.image_size, image.layout)).encode())
    h.update(f"{image.pixel_values.dtype}:{tuple(image.pixel_values.shape)}".encode())
    _digest(h, image.pixel_values)
    if image.instruction_ids is not None:  # a connector that reads the question
        h.update(b"instruction:")
        _digest(h, image.instruction_ids)
    return h.hexdigest()


class FeatureCache:
    """Visual tokens per image (see the module notes). `max_bytes=0` turns it off."""

    def __init__(self, max_bytes: int, weights: str):
        self.lru = ByteLRU(max_bytes)
        self.weights = weights

    @property
    def enabled(self) -> bool:
        return self.lru.max_bytes > 0

    def image_tokens(self, model, images: list, keys: list[str]) -> list[torch.Tensor]:
        """`model.image_tokens(images)`, with the cached ones taken from the cache."""
        if not self.enabled:
            return model.image_tokens(images)
        found = [self.lru.get(k) for k in keys]
        missing = [i for i, t in enumerate(found) if t is None]
        if missing:
            computed = model.image_tokens([images[i] for i in missing])
            for i, tokens in zip(missing, computed):
                found[i] = tokens
                self.lru.put(keys[i], tokens, tokens.numel() * tokens.element_size())
        return found


class PrefixCache:
    """Keys and values of prompt prefixes, at block boundaries (see the module notes). One entry
    holds the layers' keys and values (kv_heads, length, head_dim) of one prompt's longest block
    prefix; every boundary digest up to it points at it, so shorter prefixes read its slices."""

    def __init__(self, max_bytes: int, weights: str):
        self.lru = ByteLRU(max_bytes)
        self.weights = weights
        self._index: dict[str, tuple[str, int]] = {}  # boundary digest -> (entry key, length)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.lru.max_bytes > 0

    def boundaries(self, input_ids: list[int], slot_starts: list[int], image_keys: list[str]) -> list[str]:
        """Chained digests of the prefixes ending at BLOCK, 2*BLOCK, ... tokens. `slot_starts`: the
        position of each image's first slot; an image belongs to every prefix that holds one of
        its slots, so two prompts differing only in an image part ways at its block."""
        digests, h = [], hashlib.blake2b(self.weights.encode(), digest_size=16).digest()
        for end in range(BLOCK, len(input_ids) + 1, BLOCK):
            step = hashlib.blake2b(h, digest_size=16)
            step.update(repr(input_ids[end - BLOCK : end]).encode())
            for start, key in zip(slot_starts, image_keys):
                if end - BLOCK <= start < end:
                    step.update(key.encode())
            h = step.digest()
            digests.append(h.hex())
        return digests

    def lookup(self, digests: list[str]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """The longest cached prefix: its length and per-layer (keys, values) views."""
        if not self.enabled:
            return 0, None
        for d in reversed(digests):
            with self._lock:
                found = self._index.get(d)
            if found is None:
                continue
            entry = self.lru.get(found[0])
            if entry is None:  # evicted since
                with self._lock:
                    self._index.pop(d, None)
                continue
            length = found[1]
            return length, [(k[:, :length], v[:, :length]) for k, v in entry]
        self.lru.misses += 1
        return 0, None

    def store(self, digests: list[str], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep `layers` (copies of the prompt's first len(digests)*BLOCK positions) for every
        boundary in `digests`."""
        if not self.enabled or not digests:
            return
        key = digests[-1]
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        self.lru.put(key, layers, size)
        with self._lock:
            for i, d in enumerate(digests):
                self._index[d] = (key, (i + 1) * BLOCK)
            if len(self._index) > 64 * max(1, len(self.lru)):  # drop pointers to evicted entries
                live = set(self.lru._items)
                self._index = {d: v for d, v in self._index.items() if v[0] in live}
