"""The connector interface: vision features in, LLM-width tokens (prefix fusion) or a
cross-attention memory out.

A connector is built from the vision width, the LLM width and its own options model, so a
family's settings are validated by that family (a pixel-shuffle ratio that does not fit the
grid fails at build time, not deep in a forward pass).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
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

    def __init__(self, vision_dim: int, llm_dim: int, options: ConnectorOptions):
        super().__init__()
        self.vision_dim, self.llm_dim, self.options = vision_dim, llm_dim, options

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

    def tokens(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The connector's output as the model uses it: `forward`, then the output norm if one is
        attached (`attach_output_norm`)."""
        out = self(features, grid)
        norm = getattr(self, "output_norm", None)
        return out if norm is None else norm(out)

    def attach_output_norm(self, target_rms: float) -> None:
        self.output_norm = OutputNorm(self.llm_dim, target_rms)

    def attach_vocabulary(self, embeddings: nn.Embedding) -> None:
        self.output_norm = VocabularyMix(embeddings)


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


class VocabularyMix(nn.Module):
    """Visual tokens as mixtures of the LLM's token embeddings: softmax(s cos(x, E)) E, with E the
    LLM's input embedding table (shared, not copied, never trained here) and s a learned
    sharpness. The connector learns which words an image region should read as.

    Scores are cosines times a bounded sharpness: raw dot products let one large update make the
    softmax one-hot over the 50k entries, and a one-hot softmax has no gradient left (measured:
    a gradient norm of 117 at step 2, zero from then on)."""

    max_sharpness = 50.0

    def __init__(self, embeddings: nn.Embedding, sharpness: float = 10.0):
        super().__init__()
        # A plain attribute, not a submodule: the table belongs to the LLM (saved, frozen and
        # adapted with it); this module only reads it.
        self.__dict__["embeddings"] = embeddings
        self.log_sharpness = nn.Parameter(torch.tensor(float(sharpness)).log())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self.embeddings.weight.to(x.dtype)
        sharpness = self.log_sharpness.exp().clamp(max=self.max_sharpness)
        scores = F.normalize(x, dim=-1) @ F.normalize(table, dim=-1).t() * sharpness
        return scores.float().softmax(-1).to(x.dtype) @ table


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
