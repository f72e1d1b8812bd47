"""A lean inference path for Llama-family decoders (Llama, Qwen2, Mistral without sliding
windows): the same weights and the same maths as the Hugging Face modules, with a KV cache
preallocated once and written in place.

Why: with left padding every row of a batch writes its new key/value into the same column, so
the cache is a plain tensor slice, not a growing list that is re-concatenated every step (which
copies the whole cache per layer per step), and the attention mask is built once per call
instead of per layer per step. The projections, norms, MLPs and rotary tables are the HF
modules themselves, so the numbers match `LlamaModel` (tested to float tolerance, and greedy
outputs equal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODEL_TYPES = {"llama", "qwen2", "mistral"}


def supports(llm: nn.Module) -> bool:
    cfg = llm.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES or getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    layers = getattr(llm.base_model, "layers", None)
    if layers is None or len(layers) == 0:
        return False
    attn = layers[0].self_attn
    # Extra per-head norms (Qwen3, Gemma) or pre-hooks (cross-attention fusion) change the maths.
    hooked = any(layer._forward_pre_hooks or layer._forward_hooks for layer in layers)
    return not hooked and not hasattr(attn, "q_norm") and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StaticKVCache:
    """Keys and values for every layer, (B, kv_heads, max_len, head_dim), filled left to right."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0


class LeanDecoder:
    def __init__(self, llm: nn.Module):
        self.llm = llm
        self.model = llm.base_model
        self.layers = list(self.model.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = llm.config.num_attention_heads
        self.kv_heads = llm.config.num_key_value_heads
        self.scaling = attn.scaling

    def new_cache(self, batch: int, max_len: int, dtype, device) -> StaticKVCache:
        return StaticKVCache(len(self.layers), batch, self.kv_heads, max_len, self.head_dim, dtype, device)

    def forward(self, embeds: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """Run `embeds` (B, T, D) as the next T positions. `key_mask` (B, cache.length + T) is
        True for real tokens. Returns the final-norm hidden states (B, T, D)."""
        B, T, _ = embeds.shape
        start, end = cache.length, cache.length + T
        cos, sin = self.model.rotary_emb(embeds, position_ids=position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        keys_ok = key_mask[:, None, None, :end].bool()
        if T > 1:
            causal = torch.ones(T, end, dtype=torch.bool, device=embeds.device).tril(diagonal=start)
            # A padded query row would see no key at all (softmax of nothing is NaN); let it see
            # itself. Its output is never used, and its key stays masked for every real token.
            diag = torch.zeros(T, end, dtype=torch.bool, device=embeds.device)
            diag[torch.arange(T), torch.arange(start, end)] = True
            mask = (keys_ok & causal) | diag
        else:
            mask = keys_ok
        x = embeds
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(B, T, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache.keys[i][:, :, start:end] = k
            cache.values[i][:, :, start:end] = v
            out = F.scaled_dot_product_attention(
                q, cache.keys[i][:, :, :end], cache.values[i][:, :, :end],
                attn_mask=mask, scale=self.scaling, enable_gqa=self.heads != self.kv_heads,
            )
            x = x + attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        cache.length = end
        return self.model.norm(x)
