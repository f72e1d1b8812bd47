"""Q-Former (BLIP-2 / InstructBLIP): N learned queries read the image through cross-attention.

A BERT-style post-LayerNorm stack over the queries alone: self-attention among the queries
every layer, cross-attention to the vision features every `cross_attention_frequency` layers,
then a linear layer to the LLM width. Only the N query tokens reach the LLM, whatever the
image resolution: that fixed bottleneck is what the OCR ablation probes.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from vlmkit.model.connectors._layers import Attention, resolve_heads
from vlmkit.model.connectors.base import Connector, ConnectorOptions
from vlmkit.registry import CONNECTORS


class QFormerOptions(ConnectorOptions):
    num_queries: int = Field(default=32, ge=1)
    hidden_size: int = Field(default=768, ge=1)
    layers: int = Field(default=12, ge=1)
    heads: int = Field(default=12, ge=1)
    intermediate_size: int = Field(default=3072, ge=1)
    cross_attention_frequency: int = Field(default=2, ge=1)
    layer_norm_eps: float = 1e-12
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # Released BLIP-2 checkpoints keep the FFN of the text branch (used by the ITC/ITM
    # pretraining losses, never by the queries); set it to count them like the release does.
    text_ffn: bool = False
    # InstructBLIP embeds the instruction inside the Q-Former: word + position tables. They are
    # built (so parameter counts match) but instruction conditioning is not wired through the
    # connector interface, which only carries image features.
    text_vocab: int = Field(default=0, ge=0)
    max_text_positions: int = Field(default=512, ge=1)
    # LayerNorm on the image features first, for towers that end unnormalised (EfficientNet);
    # BLIP-2's ViT already ends in a LayerNorm.
    input_norm: bool = False


class _PostNormAttention(nn.Module):
    def __init__(self, dim: int, kv_dim: int, heads: int, eps: float, dropout: float):
        super().__init__()
        self.attn = Attention(dim, kv_dim, heads, dim // heads, bias=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.attn(x, context)))


class _PostNormFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.fc2(self.act(self.fc1(x)))))


class QFormerLayer(nn.Module):
    def __init__(self, o: QFormerOptions, vision_dim: int, has_cross: bool):
        super().__init__()
        eps, d = o.layer_norm_eps, o.dropout
        self.self_attn = _PostNormAttention(o.hidden_size, o.hidden_size, o.heads, eps, d)
        self.cross_attn = _PostNormAttention(o.hidden_size, vision_dim, o.heads, eps, d) if has_cross else None
        self.ffn = _PostNormFFN(o.hidden_size, o.intermediate_size, eps, d)
        self.text_ffn = _PostNormFFN(o.hidden_size, o.intermediate_size, eps, d) if o.text_ffn else None

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        queries = self.self_attn(queries, queries)
        if self.cross_attn is not None:
            queries = self.cross_attn(queries, features)
        return self.ffn(queries)


@CONNECTORS.register("qformer")
class QFormerConnector(Connector):
    Options = QFormerOptions

    def __init__(self, vision_dim: int, llm_dim: int, options: QFormerOptions):
        super().__init__(vision_dim, llm_dim, options)
        o = options
        resolve_heads(o.hidden_size, o.heads, None, None, "qformer")
        self.query_tokens = nn.Parameter(torch.randn(1, o.num_queries, o.hidden_size) * 0.02)
        if o.text_vocab:
            self.word_embeddings = nn.Embedding(o.text_vocab, o.hidden_size)
            self.position_embeddings = nn.Embedding(o.max_text_positions, o.hidden_size)
        self.layernorm = nn.LayerNorm(o.hidden_size, eps=o.layer_norm_eps)
        self.dropout = nn.Dropout(o.dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(o, vision_dim, has_cross=i % o.cross_attention_frequency == 0) for i in range(o.layers)
        )
        self.input_norm = nn.LayerNorm(vision_dim) if o.input_norm else nn.Identity()
        self.proj = nn.Linear(o.hidden_size, llm_dim)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return self.options.num_queries

    def query_states(self, features: torch.Tensor) -> torch.Tensor:
        """The Q-Former's output at its own width, before the LLM projection."""
        features = self.input_norm(features)
        q = self.dropout(self.layernorm(self.query_tokens.expand(features.shape[0], -1, -1)))
        for layer in self.layers:
            q = layer(q, features)
        return q

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.proj(self.query_states(features))
