"""Attention and feed-forward pieces shared by the resampling connectors and the cross-attention
blocks. Kept separate from Hugging Face's modules so their shapes follow our options (GQA,
q/k norm, SwiGLU or GELU) rather than one model family's config class."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

NormKind = Literal["layernorm", "rmsnorm"]
FFNKind = Literal["gelu", "swiglu"]


def make_norm(kind: NormKind, dim: int, eps: float = 1e-5) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else nn.RMSNorm(dim, eps=eps)


def resolve_heads(width: int, heads: int, head_dim: int | None, kv_heads: int | None, where: str) -> tuple[int, int]:
    """(head_dim, kv_heads), with a build-time error naming the bad sizes instead of a reshape
    failure in the first forward pass."""
    if heads <= 0:
        raise ValueError(f"{where}: heads must be positive, got {heads}")
    if head_dim is None:
        if width % heads:
            raise ValueError(f"{where}: width {width} is not divisible by {heads} attention heads")
        head_dim = width // heads
    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise ValueError(f"{where}: {heads} query heads are not a multiple of {kv_heads} key/value heads")
    return head_dim, kv_heads


class Attention(nn.Module):
    """Multi-head attention from `x` (queries) to `context` (keys/values), optionally grouped-query
    and with per-head q/k RMSNorm (Llama 3.2 Vision's cross-attention)."""

    def __init__(
        self,
        q_dim: int,
        kv_dim: int,
        heads: int,
        head_dim: int,
        kv_heads: int | None = None,
        bias: bool = False,
        qk_norm: bool = False,
        out_dim: int | None = None,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.heads, self.head_dim, self.kv_heads = heads, head_dim, kv_heads or heads
        self.q_proj = nn.Linear(q_dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, self.kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, self.kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, out_dim or q_dim, bias=bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, lq, _ = x.shape
        lk = context.shape[1]
        q = self.q_proj(x).view(b, lq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(context).view(b, lk, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(b, lk, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # context_mask: (B, Lk) for every query alike, or (B, Lq, Lk) per query; True = may attend.
        mask = None
        if context_mask is not None:
            mask = context_mask.to(torch.bool)
            mask = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, lq, self.heads * self.head_dim))


class FeedForward(nn.Module):
    """GELU MLP (Flamingo, BLIP) or SwiGLU (Llama-family, Idefics2)."""

    def __init__(self, dim: int, hidden: int, kind: FFNKind = "gelu", out_dim: int | None = None, bias: bool = False):
        super().__init__()
        self.kind = kind
        out_dim = out_dim or dim
        if kind == "swiglu":
            self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


def projector(in_dim: int, out_dim: int, kind: Literal["linear", "mlp"], hidden: int | None = None, bias: bool = True) -> nn.Module:
    """The per-token projection that ends most connectors: one linear, or LLaVA's Linear-GELU-Linear."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=bias)
    hidden = hidden or out_dim
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, out_dim, bias=bias))


def check_tokens(features: torch.Tensor, grid: tuple[int, int], name: str) -> None:
    if features.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"{name}: got {features.shape[1]} feature tokens for a {grid[0]}x{grid[1]} grid")
