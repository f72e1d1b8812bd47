"""The connector interface: vision features in, LLM-width tokens (prefix fusion) or a
cross-attention memory out.

A connector is built from the vision width, the LLM width and its own options model, so a
family's settings are validated by that family (a pixel-shuffle ratio that does not fit the
grid fails at build time, not deep in a forward pass).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from vlmkit.registry import CONNECTORS


class ConnectorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Connector(nn.Module):
    # "tokens": output rows fill image-token slots in the LLM input (prefix fusion).
    # "memory": output is read by gated cross-attention blocks; nothing enters the sequence.
    output_kind: ClassVar[Literal["tokens", "memory"]] = "tokens"
    Options: ClassVar[type[ConnectorOptions]] = ConnectorOptions
    # True for a connector that also reads the instruction the image is asked about (a Q-Former
    # with text input, as InstructBLIP's): `forward` then takes `texts`, one id tensor per feature
    # row (each image's `ProcessedImage.instruction_ids`, made by `instruction_encoder`).
    reads_instruction: bool = False
    # DeepStack (`model/deepstack.py`): each output token carries this many extra blocks of the
    # LLM width after its own, added to the decoder's hidden state at its slot after the first
    # `feature_levels` decoder layers (Qwen3-VL's multi-level features). 0: plain tokens.
    feature_levels: int = 0

    def __init__(self, vision_dim: int, llm_dim: int, options: ConnectorOptions):
        super().__init__()
        self.vision_dim, self.llm_dim, self.options = vision_dim, llm_dim, options
        # The width of what it outputs: the LLM's, except a memory a cross-attention block reads
        # at its own width (a Perceiver's unprojected latents).
        self.out_dim = llm_dim
        # Declared empty: the model attaches a learned row separator (`image_newline`, where its
        # processor declares `learned_newline`) and an output norm (`attach_output_norm`).
        self.register_parameter("image_newline", None)
        self.output_norm: OutputNorm | None = None

    def num_tokens(self, grid: tuple[int, int]) -> int:
        """Output tokens for one image whose features form an `h x w` grid."""
        raise NotImplementedError

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int] | None:
        """The (rows, cols) its output tokens form for an input grid, for connectors whose output
        keeps the image's 2D layout (AnyRes stitches tiles and unpads on it); None for learned
        queries / latents, which have no spatial order."""
        return None

    def check_grid(self, grid: tuple[int, int]) -> None:
        """Raise ValueError if this connector cannot take a feature grid of this shape."""

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def tokens(self, features: torch.Tensor, grid: tuple[int, int], **inputs) -> torch.Tensor:
        """The connector's output as the model uses it: `forward` (with any extra inputs it reads,
        e.g. `texts`), then the output norm if one is attached (`attach_output_norm`)."""
        out = self(features, grid, **inputs)
        return out if self.output_norm is None else self.output_norm(out)

    def attach_output_norm(self, target_rms: float) -> None:
        self.output_norm = OutputNorm(self.llm_dim, target_rms)

    def marker_tokens(self) -> tuple[str, ...]:
        """Tokens whose embeddings this connector owns (Ovis's image-structure tokens, rows of its
        visual embedding table): in a prompt with images the model embeds them with
        `marker_embeddings` (one row each, in this order) instead of the LLM's table. None by default."""
        return ()

    def marker_embeddings(self) -> torch.Tensor | None:
        """(len(marker_tokens), LLM width), or None where the connector owns no tokens."""
        return None

    def instruction_encoder(self, model_config) -> Callable[[str], torch.Tensor] | None:
        """For a connector that reads the instruction: str -> its own token ids (the chat processor
        stores them in `ProcessedImage.instruction_ids`); None otherwise."""
        return None


class OutputNorm(nn.Module):
    """RMS normalisation with a learned per-channel gain that starts at `target_rms` (the RMS of
    the LLM's token embeddings): the connector learns directions, the gain the scale."""

    def __init__(self, dim: int, target_rms: float, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.gain = nn.Parameter(torch.full((dim,), float(target_rms)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.float().pow(2).mean(-1, keepdim=True).add(self.eps).rsqrt()
        return (x.float() * rms).to(x.dtype) * self.gain


def build_connector(name: str, vision_dim: int, llm_dim: int, options: dict[str, Any], grid: tuple[int, int] | None = None) -> Connector:
    cls = CONNECTORS.get(name)
    try:
        opts = cls.Options.model_validate(options)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ValueError(f"connector {name!r}: invalid options: {problems}") from None
    connector = cls(vision_dim, llm_dim, opts)
    if grid is not None:
        connector.check_grid(grid)
    return connector
