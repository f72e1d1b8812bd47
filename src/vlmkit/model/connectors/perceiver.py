"""Perceiver Resampler (Flamingo, Idefics2): M learned latents, L layers.

Each layer's latents attend to [image features; latents] (so they can also talk to each
other), then pass an FFN, both pre-norm residual. The output is M tokens whatever the input
size. Flamingo keeps the vision width and hands the latents to gated cross-attention blocks
(`output: memory`); Idefics2 first projects the features to the LLM width with a SwiGLU MLP
and feeds the 64 latents to the LLM as prefix tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from vlmkit.model.connectors.layers import Attention, FeedForward, FFNKind, NormKind, make_norm, resolve_heads
from vlmkit.model.connectors.base import Connector, ConnectorOptions
from vlmkit.registry import CONNECTORS


class PerceiverOptions(ConnectorOptions):
    latents: int = Field(default=64, ge=1)
    layers: int = Field(default=6, ge=1)
    heads: int = Field(default=8, ge=1)
    head_dim: int | None = Field(default=64, ge=1)
    kv_heads: int | None = None
    # Width the latents live at; None = the vision width (Flamingo).
    width: int | None = None
    ffn: FFNKind = "gelu"
    ffn_mult: int = Field(default=4, ge=1)
    norm: NormKind = "layernorm"
    norm_eps: float = 1e-5
    # Map features to `width` first: "swiglu" is Idefics2's modality projection.
    input_proj: Literal["none", "linear", "swiglu"] = "none"
    input_proj_hidden: int | None = None
    # Project the latents to the LLM width at the end (False when width already is the LLM
    # width, or when the latents are a cross-attention memory at the vision width).
    project_output: bool = True
    output: Literal["tokens", "memory"] = "tokens"


class PerceiverLayer(nn.Module):
    def __init__(self, width: int, o: PerceiverOptions, head_dim: int, kv_heads: int):
        super().__init__()
        self.context_norm = make_norm(o.norm, width, o.norm_eps)
        self.latent_norm = make_norm(o.norm, width, o.norm_eps)
        self.attn = Attention(width, width, o.heads, head_dim, kv_heads)
        self.ffn_norm = make_norm(o.norm, width, o.norm_eps)
        self.ffn = FeedForward(width, width * o.ffn_mult, o.ffn)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        lat = self.latent_norm(latents)
        kv = torch.cat([self.context_norm(context), lat], dim=1)
        latents = latents + self.attn(lat, kv)
        return latents + self.ffn(self.ffn_norm(latents))


@CONNECTORS.register("perceiver")
class PerceiverConnector(Connector):
    Options = PerceiverOptions

    def __init__(self, vision_dim: int, llm_dim: int, options: PerceiverOptions):
        super().__init__(vision_dim, llm_dim, options)
        o = options
        width = o.width or vision_dim
        head_dim, kv_heads = resolve_heads(width, o.heads, o.head_dim, o.kv_heads, "perceiver")
        if o.input_proj == "none":
            if width != vision_dim:
                raise ValueError(f"perceiver: width {width} differs from the vision width {vision_dim}; set input_proj")
            self.input_proj = nn.Identity()
        elif o.input_proj == "linear":
            self.input_proj = nn.Linear(vision_dim, width)
        else:
            self.input_proj = FeedForward(vision_dim, o.input_proj_hidden or 4 * width, "swiglu", out_dim=width)
        self.latents = nn.Parameter(torch.randn(o.latents, width) * 0.02)
        self.layers = nn.ModuleList(PerceiverLayer(width, o, head_dim, kv_heads) for _ in range(o.layers))
        self.norm = make_norm(o.norm, width, o.norm_eps)
        if o.project_output:
            self.proj = nn.Linear(width, llm_dim)
            self.out_dim = llm_dim
        else:
            if o.output == "tokens" and width != llm_dim:
                raise ValueError(f"perceiver: prefix tokens need the LLM width {llm_dim}, latents have {width}; set project_output")
            self.proj = nn.Identity()
            self.out_dim = width
        # An instance attribute: the same family serves prefix fusion and cross-attention fusion.
        self.output_kind = o.output

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return self.options.latents

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        context = self.input_proj(features)
        latents = self.latents.unsqueeze(0).expand(features.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, context)
        return self.proj(self.norm(latents))
