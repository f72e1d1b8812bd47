"""Visual tokens as probability vectors over a visual embedding table (Ovis's visual tokenizer).

The tower's features (optionally s x s blocks folded into the channels, as `pixel-shuffle`
does) go through a linear head and a LayerNorm to logits over a visual vocabulary; a softmax
turns each into a probability vector, and the token is that vector's weighted sum of the rows of
a learned embedding table at the LLM's width. A visual token is thus a soft mixture of "visual
words", as a text token is one hard row of the text table.

`tokenize` picks how logits become weights: `softmax` (inference and training), `st_argmax`
(one-hot in the forward pass, the softmax's gradient in the backward pass) or `gumbel_argmax`
(the same with Gumbel noise; random at every call, as Ovis's).

The table's last `len(markers)` rows are no visual words: they are the embeddings of the
image's structure tokens (Ovis's `<IMG_START>`, `<IMG_GRID>`, `<IMG_COL>`, `<IMG_ROW>`,
`<IMG_END>`), which the head never scores. The connector declares them (`marker_tokens`,
`marker_embeddings`) and the model puts those rows in place of the text embeddings of those
tokens in a prompt with images, so they train with the connector.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from vlmkit.model.connectors.base import Connector, ConnectorOptions
from vlmkit.model.connectors.layers import check_tokens
from vlmkit.model.connectors.pixel_shuffle import pixel_shuffle, shuffle_factor
from vlmkit.registry import CONNECTORS


class EmbeddingTableOptions(ConnectorOptions):
    # Rows of the table, the marker rows included (Ovis2's vision_config.vocab_size).
    vocab_size: int = Field(default=16384, gt=0)
    # 1/s for folding s x s feature blocks before the head (Ovis2's 1 / hidden_stride); 1: none.
    ratio: float = Field(default=1.0, gt=0, le=1)
    tokenize: Literal["softmax", "st_argmax", "gumbel_argmax"] = "softmax"
    # Tokens whose embeddings are the table's last rows, in row order.
    markers: list[str] = Field(default_factory=list)
    norm_eps: float = 1e-5

    @field_validator("ratio")
    @classmethod
    def _integer_factor(cls, ratio: float) -> float:
        shuffle_factor(ratio)
        return ratio

    @model_validator(mode="after")
    def _room_for_words(self) -> EmbeddingTableOptions:
        if len(self.markers) >= self.vocab_size:
            raise ValueError(f"vocab_size {self.vocab_size} leaves no visual words beside {len(self.markers)} marker rows")
        return self


def straight_through_argmax(logits: torch.Tensor) -> torch.Tensor:
    """One-hot of the argmax forward, the softmax's gradient backward."""
    soft = logits.softmax(-1)
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    return hard - soft.detach() + soft


@CONNECTORS.register("visual-embedding-table")
class EmbeddingTableConnector(Connector):
    Options = EmbeddingTableOptions

    def __init__(self, vision_dim: int, llm_dim: int, options: EmbeddingTableOptions):
        super().__init__(vision_dim, llm_dim, options)
        self.factor = shuffle_factor(options.ratio)
        self.words = options.vocab_size - len(options.markers)
        self.head_linear = nn.Linear(vision_dim * self.factor**2, self.words, bias=False)
        self.head_norm = nn.LayerNorm(self.words, eps=options.norm_eps)
        self.table = nn.Embedding(options.vocab_size, llm_dim)

    def check_grid(self, grid: tuple[int, int]) -> None:
        h, w = grid
        if h % self.factor or w % self.factor:
            raise ValueError(f"visual-embedding-table ratio {self.options.ratio} folds {self.factor}x{self.factor} blocks, "
                             f"but the vision tower gives a {h}x{w} feature grid; change the image size or the ratio")

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return grid[0] // self.factor, grid[1] // self.factor

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return (grid[0] // self.factor) * (grid[1] // self.factor)

    def probabilities(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, tokens, visual words): each token's weights over the table's word rows."""
        self.check_grid(grid)
        check_tokens(features, grid, "visual-embedding-table")
        x = pixel_shuffle(features, grid, self.factor) if self.factor > 1 else features
        logits = self.head_norm(self.head_linear(x))
        if self.options.tokenize == "st_argmax":
            return straight_through_argmax(logits)
        if self.options.tokenize == "gumbel_argmax":
            return F.gumbel_softmax(logits, dim=-1, hard=True)
        return logits.softmax(-1)

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.probabilities(features, grid) @ self.table.weight[: self.words]

    def marker_tokens(self) -> tuple[str, ...]:
        return tuple(self.options.markers)

    def marker_embeddings(self) -> torch.Tensor | None:
        return self.table.weight[self.words:] if self.options.markers else None
