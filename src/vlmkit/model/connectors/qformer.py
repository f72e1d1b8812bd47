"""Q-Former (BLIP-2 / InstructBLIP): N learned queries read the image through cross-attention.

A BERT-style post-LayerNorm stack over the queries alone: self-attention among the queries
every layer, cross-attention to the vision features every `cross_attention_frequency` layers,
then a linear layer to the LLM width. Only the N query tokens reach the LLM, whatever the
image resolution: that fixed bottleneck is what the OCR ablation probes.

With `text_input: true` (InstructBLIP) the instruction is read too: its tokens (in the Q-Former's
own tokenizer, `text_tokenizer`) are embedded (word + position) after the queries, the
self-attention spans queries and text, cross-attention and the query FFN act on the queries, the
text FFN on the text, and only the queries leave. The chat processor tokenizes the text of the
message that holds each image (`instruction_encoder`) into `ProcessedImage.instruction_ids`; the
model hands those to the connector (`Connector.reads_instruction`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from pydantic import Field
from torch import nn

from vlmkit.model.connectors.layers import Attention, resolve_heads
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
    # InstructBLIP embeds the instruction inside the Q-Former: word + position tables.
    text_vocab: int = Field(default=0, ge=0)
    max_text_positions: int = Field(default=512, ge=1)
    # Read the instruction (needs text_vocab and text_ffn): the chat processor tokenizes the text
    # of the message holding each image with `text_tokenizer` (a tokenizer folder; a relative path
    # is inside the LLM's folder, so it moves with an imported checkpoint).
    text_input: bool = False
    text_tokenizer: str | None = None
    # LayerNorm on the image features first, for towers that end unnormalised (EfficientNet);
    # BLIP-2's ViT already ends in a LayerNorm.
    input_norm: bool = False


class _PostNormAttention(nn.Module):
    def __init__(self, dim: int, kv_dim: int, heads: int, eps: float, dropout: float):
        super().__init__()
        self.attn = Attention(dim, kv_dim, heads, dim // heads, bias=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(x + self.dropout(self.attn(x, context, context_mask)))


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

    def forward(self, x: torch.Tensor, features: torch.Tensor, num_queries: int | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """`x`: the queries, then (text input) the instruction's tokens; `mask` (B, L) marks real
        positions of `x` for the self-attention. Cross-attention and the query FFN act on the
        first `num_queries` positions, the text FFN on the rest."""
        n = x.shape[1] if num_queries is None else num_queries
        x = self.self_attn(x, x, mask)
        queries = x[:, :n]
        if self.cross_attn is not None:
            queries = self.cross_attn(queries, features)
        queries = self.ffn(queries)
        if x.shape[1] == n:
            return queries
        if self.text_ffn is None:
            raise ValueError("qformer: text input needs the text FFN (text_ffn: true)")
        return torch.cat([queries, self.text_ffn(x[:, n:])], dim=1)


@CONNECTORS.register("qformer")
class QFormerConnector(Connector):
    Options = QFormerOptions

    def __init__(self, vision_dim: int, llm_dim: int, options: QFormerOptions):
        super().__init__(vision_dim, llm_dim, options)
        o = options
        resolve_heads(o.hidden_size, o.heads, None, None, "qformer")
        if o.text_input and not (o.text_vocab and o.text_ffn):
            raise ValueError("qformer: text_input needs the instruction embeddings and text FFN (text_vocab > 0, text_ffn: true)")
        self.reads_instruction = o.text_input
        self._text_tokenizer = None
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

    def query_states(self, features: torch.Tensor, texts: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """The Q-Former's output at its own width, before the LLM projection. `texts`: one
        instruction's token ids per feature row (text input), None or empty for none."""
        features = self.input_norm(features)
        b, n = features.shape[0], self.options.num_queries
        x = self.query_tokens.expand(b, -1, -1)
        mask = None
        if texts is not None and self.reads_instruction:
            if len(texts) != b:
                raise ValueError(f"qformer: {len(texts)} instructions for {b} feature rows")
            lengths = [0 if t is None else int(t.numel()) for t in texts]
            longest = max(lengths, default=0)
            if longest > self.options.max_text_positions:
                raise ValueError(f"qformer: an instruction of {longest} tokens is longer than the Q-Former's "
                                 f"{self.options.max_text_positions} positions")
            if longest:
                ids = torch.zeros(b, longest, dtype=torch.long, device=features.device)
                mask = torch.ones(b, n + longest, dtype=torch.bool, device=features.device)
                for i, (t, k) in enumerate(zip(texts, lengths)):
                    if k:
                        ids[i, :k] = t.to(features.device).reshape(-1)
                    mask[i, n + k:] = False
                positions = torch.arange(longest, device=features.device)
                text = self.word_embeddings(ids) + self.position_embeddings(positions)[None]
                x = torch.cat([x, text.to(x.dtype)], dim=1)
        x = self.dropout(self.layernorm(x))
        for layer in self.layers:
            x = layer(x, features, n, mask)
        return x[:, :n]

    def forward(self, features: torch.Tensor, grid: tuple[int, int], texts: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        return self.proj(self.query_states(features, texts))

    def load_text_tokenizer(self, model_config):
        """The Q-Former's own tokenizer (`text_tokenizer`; relative to the LLM's folder), loaded once."""
        if self._text_tokenizer is None:
            from transformers import AutoTokenizer

            path = Path(self.options.text_tokenizer or "qformer_tokenizer")
            if not path.is_absolute() and model_config.llm.path:
                path = Path(model_config.llm.path) / path
            if not path.is_dir():
                raise FileNotFoundError(f"qformer: the instruction tokenizer folder {path} (connector.options.text_tokenizer) does not exist")
            self._text_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return self._text_tokenizer

    def instruction_encoder(self, model_config) -> Callable[[str], torch.Tensor] | None:
        """str -> the Q-Former tokenizer's ids (with its special tokens), for the chat processor;
        None when this Q-Former reads no text."""
        if not self.reads_instruction:
            return None
        tokenizer = self.load_text_tokenizer(model_config)
        return lambda text: torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
