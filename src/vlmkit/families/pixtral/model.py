"""A native-resolution ViT with 2D rotary positions (Pixtral-style), as a vision tower.

There is no learned position table tied to one image size: each patch's query and key are
rotated by its row (half of the rotary pairs) and its column (the other half), so attention
depends only on relative 2D offsets and any image whose sides are multiples of the patch size
gives a (H/p) x (W/p) grid. Pre-norm RMSNorm blocks with a SwiGLU FFN and no biases; at
Pixtral-ViT's shape (1024 wide, 24 layers, 4096 FFN, patch 16) it has Pixtral's parameter count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vlmkit.config import VisionConfig
from vlmkit.model.connectors.layers import FeedForward
from vlmkit.model.vision import VisionTower
from vlmkit.registry import VISION_TOWERS


class RopeViTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden_size: int = Field(default=64, ge=1)
    num_hidden_layers: int = Field(default=2, ge=1)
    num_attention_heads: int = Field(default=4, ge=1)
    intermediate_size: int | None = None
    patch_size: int = Field(default=16, ge=1)
    num_channels: int = 3
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


def rope_2d_angles(rows: int, cols: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """(rows*cols, head_dim/2) rotation angles: the first half of the pairs turn with the row
    index, the second half with the column index, each over its own frequency ladder."""
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    r = torch.arange(rows, device=device, dtype=torch.float32)
    c = torch.arange(cols, device=device, dtype=torch.float32)
    row_angles = (r[:, None] * freqs[None]).repeat_interleave(cols, dim=0)
    col_angles = (c[:, None] * freqs[None]).repeat(rows, 1)
    return torch.cat([row_angles, col_angles], dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x (..., N, head_dim) by angles (N, head_dim/2)."""
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class RopeBlock(nn.Module):
    def __init__(self, c: RopeViTConfig):
        super().__init__()
        d = c.hidden_size
        self.heads, self.head_dim = c.num_attention_heads, d // c.num_attention_heads
        self.attention_norm = nn.RMSNorm(d, eps=c.norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.ffn_norm = nn.RMSNorm(d, eps=c.norm_eps)
        self.ffn = FeedForward(d, c.intermediate_size or 4 * d, "swiglu")

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.attention_norm(x)
        q, k, v = (p(h).view(b, n, self.heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.o_proj(attn)
        return x + self.ffn(self.ffn_norm(x))


class RopeViTTower(VisionTower):
    from_files = False  # built from a config; its weights travel with the checkpoint

    def __init__(self, config: RopeViTConfig):
        super().__init__()
        c = config
        if c.hidden_size % c.num_attention_heads:
            raise ValueError(f"rope-vit: hidden_size {c.hidden_size} is not divisible by {c.num_attention_heads} heads")
        if (c.hidden_size // c.num_attention_heads) % 4:
            raise ValueError("rope-vit: head_dim must be a multiple of 4 (2D RoPE splits its pairs between rows and columns)")
        self.config = c
        self.hidden_size = c.hidden_size
        self.patch_size = c.patch_size
        self.patch_conv = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False)
        self.ln_pre = nn.RMSNorm(c.hidden_size, eps=c.norm_eps)
        self.layers = nn.ModuleList(RopeBlock(c) for _ in range(c.num_hidden_layers))

    def grid(self, image_size: int) -> tuple[int, int]:
        return self.grid_hw(image_size, image_size)

    def grid_hw(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"rope-vit: image {width}x{height} is not a multiple of the patch size {p}")
        return height // p, width // p

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        rows, cols = self.grid_hw(pixel_values.shape[-2], pixel_values.shape[-1])
        x = self.patch_conv(pixel_values).flatten(2).transpose(1, 2)
        x = self.ln_pre(x)
        angles = rope_2d_angles(rows, cols, self.hidden_size // self.config.num_attention_heads, self.config.rope_theta, x.device)
        for layer in self.layers:
            x = layer(x, angles)
        return x


@VISION_TOWERS.register("rope-vit")
def build_rope_vit(cfg: VisionConfig, pretrained: bool = False) -> VisionTower:
    return RopeViTTower(RopeViTConfig.model_validate(cfg.config or {}))
