"""A lean inference path for Llama-family decoders (Llama, Qwen2, Mistral without sliding
windows): the same weights and the same maths as the Hugging Face modules, with less work
around the matrix products.

What it saves, each measured on the CPU this project is developed on (benchmarks/generate_speed.py):

* **The KV cache is preallocated once and written in place.** With left padding every row of a
  batch writes its new key/value into the same column, so the cache is a plain tensor slice, not
  a growing list that is re-concatenated every step (which copies the whole cache per layer).
* **Weights in the layout matrix-vector products read fastest.** A decoding step multiplies one
  row per sequence by every weight, so it is bound by how fast the weights stream from memory.
  MKL streams a weight about 1.7x (MLP up/gate) to 2.5x (LM head) faster when its longer side is
  the contiguous one, so those weights get a column-major copy (same values, same shape). The
  copies are made once per set of weights and reused until any weight changes.
* **Fewer, in-place operations.** Rotary tables are computed once per call (a K=1 outer product,
  so the values are bitwise those of the HF rotary module), the decode mask is built once per
  call, the rotated keys are written straight into the cache, and residuals and activations are
  updated in place. Module calls are bypassed (their hooks are refused by `supports`).

The operation order within each step is the HF modules' own (RMSNorm as `weight * normed` in
the input dtype, RoPE as `x*cos + rotate_half(x)*sin`), so outputs match `LlamaModel` to float
tolerance, and greedy decoding gives the same tokens (tested).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODEL_TYPES = {"llama", "qwen2", "mistral"}
# Rotary variants whose frequencies do not depend on the sequence length, so one table serves
# every position of a call.
_STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}


def supports(llm: nn.Module) -> bool:
    cfg = llm.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES or getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    layers = getattr(llm.base_model, "layers", None)
    if layers is None or len(layers) == 0:
        return False
    attn = layers[0].self_attn
    # Extra per-head norms (Qwen3, Gemma) or hooks (cross-attention fusion, adapters) change the maths.
    modules = [llm.base_model.norm, llm.get_output_embeddings()]
    for layer in layers:
        modules += [layer, layer.input_layernorm, layer.post_attention_layernorm, layer.mlp, layer.self_attn,
                    layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    hooked = any(m._forward_pre_hooks or m._forward_hooks for m in modules)
    plain_linears = all(type(m) is nn.Linear for m in modules if isinstance(m, nn.Linear))
    return (not hooked and plain_linears and not hasattr(attn, "q_norm")
            and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")))


def _decode_layout(weight: torch.Tensor) -> torch.Tensor:
    """The same matrix, stored so that its longer side is contiguous (see the module notes)."""
    out_features, in_features = weight.shape
    if out_features > in_features and weight.is_contiguous():
        return weight.t().contiguous().t()
    return weight


@dataclass
class _Linear:
    weight: torch.Tensor
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _linear(module: nn.Linear) -> _Linear:
    return _Linear(_decode_layout(module.weight.detach()), None if module.bias is None else module.bias.detach())


@dataclass
class _Norm:
    weight: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # HF's RMSNorm: normalise in float32, cast back, then scale in the input dtype.
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return self.weight * normed.to(x.dtype)


def _norm(module: nn.Module) -> _Norm:
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps")
    return _Norm(module.weight.detach(), float(eps))


@dataclass
class _Layer:
    input_norm: _Norm
    q: _Linear
    k: _Linear
    v: _Linear
    o: _Linear
    post_norm: _Norm
    gate: _Linear
    up: _Linear
    down: _Linear


class _Weights:
    """Decode-layout views and copies of one LLM's weights, valid while none of them changes."""

    def __init__(self, llm: nn.Module):
        model = llm.base_model
        self.signature = _signature(llm)
        self.layers = [
            _Layer(_norm(layer.input_layernorm), _linear(layer.self_attn.q_proj), _linear(layer.self_attn.k_proj),
                   _linear(layer.self_attn.v_proj), _linear(layer.self_attn.o_proj), _norm(layer.post_attention_layernorm),
                   _linear(layer.mlp.gate_proj), _linear(layer.mlp.up_proj), _linear(layer.mlp.down_proj))
            for layer in model.layers
        ]
        self.final_norm = _norm(model.norm)
        self.head = _linear(llm.get_output_embeddings())


def _signature(llm: nn.Module) -> tuple:
    # In-place updates (optimizer steps, load_state_dict) bump _version; .to() makes new storage.
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in llm.parameters())


_WEIGHTS: "weakref.WeakKeyDictionary[nn.Module, _Weights]" = weakref.WeakKeyDictionary()


def decode_weights(llm: nn.Module) -> _Weights:
    """Cached per LLM; rebuilt when any parameter changed since the last call."""
    cached = _WEIGHTS.get(llm)
    if cached is None or cached.signature != _signature(llm):
        _WEIGHTS.pop(llm, None)  # free the old copies before making new ones
        cached = _WEIGHTS[llm] = _Weights(llm)
    return cached


def release(llm: nn.Module) -> None:
    """Drop the decode-layout copies of `llm` (they are rebuilt on the next generate call)."""
    _WEIGHTS.pop(llm, None)


class StaticKVCache:
    """Keys and values for every layer, (B, kv_heads, max_len, head_dim), filled left to right."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0


class LeanDecoder:
    """One generation call: a KV cache for `max_len` positions, rotary tables for the positions
    the call will use, and the additive decode mask built from `key_mask` (B, max_len)."""

    def __init__(self, llm: nn.Module, batch: int, max_len: int, key_mask: torch.Tensor, dtype, device):
        self.llm = llm
        self.model = llm.base_model
        self.weights = decode_weights(llm)
        attn = self.model.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = llm.config.num_attention_heads
        self.kv_heads = llm.config.num_key_value_heads
        self.scaling = attn.scaling
        act = self.model.layers[0].mlp.act_fn
        self.inplace_silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
        self.act = act
        self.cache = StaticKVCache(len(self.weights.layers), batch, self.kv_heads, max_len, self.head_dim, dtype, device)
        self.key_ok = key_mask.bool()
        # One decode mask for the whole call (sliced per step); none at all without padding.
        self.decode_mask = None
        if not bool(self.key_ok.all()):
            self.decode_mask = torch.zeros(key_mask.shape, dtype=dtype, device=device).masked_fill_(~self.key_ok, float("-inf"))[:, None, None, :]
        self._rope_table = None
        rope = self.model.rotary_emb
        if getattr(rope, "rope_type", "default") in _STATIC_ROPE_TYPES:
            probe = torch.empty(0, dtype=dtype, device=device)
            cos, sin = rope(probe, position_ids=torch.arange(max_len, device=device)[None])
            half = self.head_dim // 2
            # rotate_half(x) * sin == cat(x2, x1) * cat(-sin1, sin2): negation is exact.
            signed_sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
            self._rope_table = (cos[0], signed_sin)

    def _rope(self, embeds: torch.Tensor, position_ids: torch.Tensor):
        if self._rope_table is not None:
            cos, signed_sin = self._rope_table
            return cos[position_ids], signed_sin[position_ids]
        cos, sin = self.model.rotary_emb(embeds, position_ids=position_ids)
        half = self.head_dim // 2
        return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

    def _mask(self, T: int, start: int, end: int, device) -> torch.Tensor | None:
        if T == 1:
            return None if self.decode_mask is None else self.decode_mask[..., :end]
        keys_ok = self.key_ok[:, None, None, :end]
        causal = torch.ones(T, end, dtype=torch.bool, device=device).tril(diagonal=start)
        # A padded query row would see no key at all (softmax of nothing is NaN); let it see
        # itself. Its output is never used, and its key stays masked for every real token.
        diag = torch.zeros(T, end, dtype=torch.bool, device=device)
        diag[torch.arange(T), torch.arange(start, end)] = True
        return (keys_ok & causal) | diag

    @staticmethod
    def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """out = x*cos + rotate_half(x)*sin, the HF operation order, written into `out`."""
        half = x.shape[-1] // 2
        rotated = torch.cat((x[..., half:], x[..., :half]), dim=-1).mul_(signed_sin)
        return torch.mul(x, cos, out=out).add_(rotated)

    def forward_last(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Run `embeds` (B, T, D) as the next T positions; the final-norm hidden state of the
        last position (B, D)."""
        B, T, _ = embeds.shape
        cache = self.cache
        start, end = cache.length, cache.length + T
        cos, signed_sin = self._rope(embeds, position_ids)
        cos, signed_sin = cos.unsqueeze(1), signed_sin.unsqueeze(1)  # (B, 1, T, hd)
        mask = self._mask(T, start, end, embeds.device)
        H, KV, hd = self.heads, self.kv_heads, self.head_dim
        x = embeds
        for i, w in enumerate(self.weights.layers):
            h = w.input_norm(x)
            q = w.q(h).view(B, T, H, hd).transpose(1, 2)
            k = w.k(h).view(B, T, KV, hd).transpose(1, 2)
            keys, values = cache.keys[i], cache.values[i]
            self._rotate_into(keys[:, :, start:end], k, cos, signed_sin)
            values[:, :, start:end] = w.v(h).view(B, T, KV, hd).transpose(1, 2)
            q = self._rotate_into(torch.empty_like(q), q, cos, signed_sin)
            out = F.scaled_dot_product_attention(
                q, keys[:, :, :end], values[:, :, :end], attn_mask=mask, scale=self.scaling, enable_gqa=H != KV,
            )
            attn_out = w.o(out.transpose(1, 2).reshape(B, T, H * hd))
            x = x + attn_out if i == 0 else x.add_(attn_out)  # never write into the caller's embeds
            h = w.post_norm(x)
            gate = w.gate(h)
            gate = F.silu(gate, inplace=True) if self.inplace_silu else self.act(gate)
            x.add_(w.down(gate.mul_(w.up(h))))
        cache.length = end
        return self.weights.final_norm(x[:, -1])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.weights.head(hidden)
