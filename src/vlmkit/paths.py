"""Where vlmkit keeps converted weights and generated data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`VLMKIT_CACHE`, default `~/.cache/vlmkit`."""
    root = Path(os.environ.get("VLMKIT_CACHE", Path.home() / ".cache" / "vlmkit")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def offline() -> None:
    """Models only ever load from local files: make Hugging Face refuse the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
