"""A lean inference path for Llama-family decoders (Llama, Qwen2, Mistral without sliding
windows; Qwen2-VL and Qwen2.5-VL with their 3D M-RoPE positions): the same weights and the
same maths as the Hugging Face modules, with less work around the matrix products. Each item
was measured on the CPU this project is developed on (benchmarks/generate_speed.py; figures in
docs/serving.md):

* **The KV cache is preallocated once and written in place.** With left padding every row of a
  batch writes its new key/value into the same column, so the cache is a plain tensor slice, not
  a growing list that is re-concatenated every step (which copies the whole cache per layer).
* **Weights in the layout matrix-vector products read fastest, at batch 1 only.** A batch-1
  decoding step multiplies one row by every weight, so it is bound by how fast the weights
  stream from memory. MKL streams a weight about 1.4x (MLP up/gate) to 2x (LM head) faster when
  its longer side is the contiguous one, so at batch 1 those weights get a column-major copy
  (same values, same shape). With several rows (a batch of 8, a prompt) the same copy is up to
  1.3x slower than the row-major weight (measured on an AMD EPYC), so the prompt and batched
  steps read the row-major one, and the copy is made only once a batch-1 call needs it.
* **Fewer operations.** q|k|v and gate|up are one map each; in float32 the RMSNorm scales are
  folded into the maps after them; rotary tables are computed once per call (a K=1 outer product,
  so the values are bitwise those of the HF rotary module); RoPE runs on q and k at once; the
  decode mask is built once per call; residuals and activations are updated in place; module
  calls are bypassed (`supports` refuses hooked or wrapped modules).
* **Optionally, a compiled single-token step** (`compile=True`): fixed shapes, so torch.compile
  builds one graph per batch size and length bucket, captured as a CUDA graph on GPUs.

The copies (fused maps, column-major layouts, folded norms) are made once per set of weights
and reused until any parameter changes. The operation order within each step is the HF modules'
own (RMSNorm in float32 then scaled in the input dtype, RoPE as `x*cos + rotate_half(x)*sin`), so
outputs match `LlamaModel` to float tolerance and greedy decoding gives the same tokens (tested).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODEL_TYPES = {"llama", "qwen2", "mistral"}
# Decoders with the same layers whose rotary positions are 3D (M-RoPE, `processing/mrope.py`):
# each rotary frequency reads the temporal, height or width position, in contiguous sections.
MROPE_MODEL_TYPES = {"qwen2_vl_text", "qwen2_5_vl_text"}
# Rotary variants whose frequencies do not depend on the sequence length, so one table serves
# every position of a call.
_STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}


def supports(llm: nn.Module) -> bool:
    cfg = llm.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES | MROPE_MODEL_TYPES or getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    layers = getattr(llm.base_model, "layers", None)
    if layers is None or len(layers) == 0:
        return False
    attn = layers[0].self_attn
    if hasattr(attn, "q_norm") or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return False  # extra per-head norms (Qwen3, Gemma) or another attention layout
    # Hooks (cross-attention fusion) or wrapped linears (adapters) change the maths.
    modules = [llm.base_model.norm, llm.get_output_embeddings()]
    for layer in layers:
        modules += [layer, layer.input_layernorm, layer.post_attention_layernorm, layer.mlp, layer.self_attn,
                    layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    hooked = any(m._forward_pre_hooks or m._forward_hooks for m in modules)
    # An adapter (peft's LoRA layer) replaces the projection with a module that is not an
    # nn.Linear at all, so every projection must be a plain nn.Linear, and nothing inside it.
    projections = [m for layer in layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                                    layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
    # Quantized weights (torchao's tensor subclasses) cannot be copied into the decode layout.
    plain_linears = all(type(m) is nn.Linear and not any(True for _ in m.children()) and type(m.weight) is nn.Parameter
                        for m in projections)
    return not hooked and plain_linears


def _gemv_layout(weight: torch.Tensor) -> torch.Tensor | None:
    """The same matrix, stored so that its longer side is contiguous (see the module notes), or
    None where the weight as it is serves (not wider than tall, or not on a CPU)."""
    out_features, in_features = weight.shape
    if weight.device.type == "cpu" and out_features > in_features and weight.is_contiguous():
        return weight.t().contiguous().t()
    return None


@dataclass
class _Linear:
    """A linear map. `gemv` is its weight in the layout a one-row product reads fastest, made by
    `_Weights.prepare_gemv` for batch-1 decoding only: with several rows (a batch, a prompt) the
    row-major weight is the faster one, and most calls never need the copy."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    gemv: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        one_row = self.gemv is not None and x.numel() == x.shape[-1]
        return F.linear(x, self.gemv if one_row else self.weight, self.bias)


def _linear(*modules: nn.Linear, input_scale: torch.Tensor | None = None) -> _Linear:
    """One linear map for the modules' outputs side by side (q|k|v, gate|up): one product to
    dispatch and one larger weight to stream, instead of several small ones. `input_scale`
    (an RMSNorm weight) is folded into the columns: W @ (g * x) == (W * g) @ x."""
    weights = [m.weight.detach() for m in modules]
    weight = weights[0] if len(weights) == 1 else torch.cat(weights, dim=0)
    if input_scale is not None:
        weight = weight * input_scale.detach()
    bias = None
    if any(m.bias is not None for m in modules):
        bias = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules])
    return _Linear(weight, bias)


@dataclass
class _Norm:
    """HF's RMSNorm: normalise in float32, cast back, then scale in the input dtype. The scale is
    None where it was folded into the next linear map."""

    weight: torch.Tensor | None
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x, (x.shape[-1],), None, self.eps)  # computes in float32 for low precision
        return normed if self.weight is None else self.weight * normed


def _eps(module: nn.Module) -> float:
    eps = getattr(module, "variance_epsilon", None)
    return float(module.eps if eps is None else eps)


@dataclass
class _Layer:
    input_norm: _Norm
    qkv: _Linear
    o: _Linear
    post_norm: _Norm
    gate_up: _Linear
    down: _Linear


class _Weights:
    """Decode-layout copies of one LLM's weights, valid while none of the weights changes
    (and, for the compiled step, the buffers of its last call: `static_buffers`).

    In float32 the RMSNorm scales are folded into the maps that follow them (one multiply less
    per norm, a different rounding of the same product); in 16-bit they are not, because the
    folded weight would be rounded to 8 bits of mantissa once more."""

    def __init__(self, llm: nn.Module):
        model = llm.base_model
        self.signature = _signature(llm)
        fold = llm.get_output_embeddings().weight.dtype == torch.float32

        def norm_and_scale(module):
            weight = module.weight.detach()
            return (_Norm(None, _eps(module)), weight) if fold else (_Norm(weight, _eps(module)), None)

        self.layers = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            input_norm, input_scale = norm_and_scale(layer.input_layernorm)
            post_norm, post_scale = norm_and_scale(layer.post_attention_layernorm)
            self.layers.append(_Layer(
                input_norm, _linear(attn.q_proj, attn.k_proj, attn.v_proj, input_scale=input_scale), _linear(attn.o_proj),
                post_norm, _linear(mlp.gate_proj, mlp.up_proj, input_scale=post_scale), _linear(mlp.down_proj),
            ))
        self.final_norm, final_scale = norm_and_scale(model.norm)
        self.head = _linear(llm.get_output_embeddings(), input_scale=final_scale)
        self.static_buffers = None

    def _parts(self) -> list:
        parts = [self.final_norm, self.head]
        for layer in self.layers:
            parts += [layer.input_norm, layer.qkv, layer.o, layer.post_norm, layer.gate_up, layer.down]
        return parts

    def prepare_gemv(self) -> None:
        """Give the wide maps their one-row layout (once; kept with these weights)."""
        for part in self._parts():
            if isinstance(part, _Linear) and part.gemv is None:
                part.gemv = _gemv_layout(part.weight)

    def tensors(self) -> list[torch.Tensor]:
        return [t for part in self._parts() for t in (part.weight, getattr(part, "bias", None), getattr(part, "gemv", None))
                if t is not None]


def _silu_(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=True)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """rotate_half(x) * sin == cat(x2, x1) * cat(-sin1, sin2): the negation moves into the table
    (exact), so RoPE needs no negation per step."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _decoder_layer(x, index, w: _Layer, cos, signed_sin, dims, scaling, act, mask, store_kv, first: bool,
                   last_only: bool = False):
    """One Llama-family layer over x (B, T, D), in the HF modules' operation order. `store_kv(index,
    keys, values)` writes this step's rotated keys and values into the cache and returns what
    attention reads; `act` may work in place. The first layer leaves x (the caller's embeddings)
    unwritten; later layers update the residual in place. `last_only` (the last layer of a
    prompt): keys and values for every position, the rest for the last position only, (B, 1, D)
    out, since nothing reads the other positions' outputs."""
    heads, kv_heads, head_dim = dims
    B, T, _ = x.shape
    qkv = w.qkv(w.input_norm(x)).view(B, T, heads + 2 * kv_heads, head_dim)
    qk = qkv[:, :, : heads + kv_heads]
    # RoPE on q and k at once: x*cos + rotate_half(x)*sin, with rotate_half as a roll by half.
    rotated = torch.roll(qk, head_dim // 2, dims=-1).mul_(signed_sin)
    qk = (qk * cos).add_(rotated)
    keys, values = store_kv(index, qk[:, :, heads:].transpose(1, 2), qkv[:, :, heads + kv_heads :].transpose(1, 2))
    queries = qk[:, :, :heads]
    if last_only and T > 1:
        queries, x, T = queries[:, -1:], x[:, -1:], 1
        mask = None if mask is None else mask[..., -1:, :]
    out = F.scaled_dot_product_attention(queries.transpose(1, 2), keys, values, attn_mask=mask, scale=scaling,
                                         enable_gqa=heads != kv_heads)
    attn_out = w.o(out.transpose(1, 2).reshape(B, T, heads * head_dim))
    x = x + attn_out if first else x.add_(attn_out)
    gate_up = w.gate_up(w.post_norm(x))
    inner = gate_up.shape[-1] // 2
    return x.add_(w.down(act(gate_up[..., :inner]).mul_(gate_up[..., inner:])))


def _mrope_axes(rope: nn.Module, head_dim: int, device) -> torch.Tensor:
    """(head_dim,) the axis (0 temporal, 1 height, 2 width) each rotary column reads: the
    frequencies are cut into `mrope_section` runs taken from the axes in turn, and both halves
    of the head use the same frequencies (transformers' `recomposition_frequencies`)."""
    sections = list(rope.mrope_section)
    if sum(sections) != head_dim // 2:
        raise ValueError(f"mrope_section {sections} does not cover the {head_dim // 2} rotary frequencies")
    half = torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(sections)])
    return torch.cat([half, half]).to(device)


def _rope_at(table: tuple, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin (B, T, head_dim) at `position_ids`: (B, T), or (3, B, T) for
    M-RoPE, where column j reads the table at its axis' position (a gather, so the values are
    bitwise the table's)."""
    cos, signed_sin, axis = table
    if axis is None:
        return cos[position_ids], signed_sin[position_ids]
    _, B, T = position_ids.shape
    rows = position_ids[axis].permute(1, 2, 0).reshape(B * T, -1)  # each column's own position
    return cos.gather(0, rows).view(B, T, -1), signed_sin.gather(0, rows).view(B, T, -1)


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

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device,
                 zeroed: bool = False):
        # Attention over the whole cache (the compiled step) multiplies unwritten columns by a zero
        # probability, and 0 * NaN from uninitialised memory is NaN: that cache starts zeroed.
        shape = (batch, kv_heads, max_len, head_dim)
        alloc = torch.zeros if zeroed else torch.empty
        self.keys = [alloc(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [alloc(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0


class LeanDecoder:
    """One generation call: a KV cache for `max_len` positions, rotary tables for the positions
    the call will use, and the additive decode mask built from `key_mask` (B, max_len).
    `max_position`: the largest position id the call will use, where it may exceed `max_len`
    (M-RoPE numbers a video's frames by time)."""

    def __init__(self, llm: nn.Module, batch: int, max_len: int, key_mask: torch.Tensor, dtype, device,
                 compile: bool = False, max_position: int | None = None):
        self.llm = llm
        self.model = llm.base_model
        self.weights = decode_weights(llm)
        if batch == 1:
            self.weights.prepare_gemv()
        attn = self.model.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = llm.config.num_attention_heads
        self.kv_heads = llm.config.num_key_value_heads
        self.scaling = attn.scaling
        act = self.model.layers[0].mlp.act_fn
        self.act = _silu_ if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" else act
        self.compiled = None
        rope = self.model.rotary_emb
        static_rope = getattr(rope, "rope_type", "default") in _STATIC_ROPE_TYPES
        self._axis = _mrope_axes(rope, self.head_dim, device) if llm.config.model_type in MROPE_MODEL_TYPES else None
        rope_len = max(max_len, (max_position or 0) + 1)
        if compile:
            if not static_rope:
                raise ValueError(f"compiled decoding needs a static rotary embedding, not {rope.rope_type!r}")
            # One compiled graph per (batch, bucket): round the cache up so calls of nearby lengths
            # share it. The extra columns are never written and stay masked.
            bucket = -(-max_len // _LENGTH_BUCKET) * _LENGTH_BUCKET
            key_mask = torch.cat([key_mask, key_mask.new_zeros((batch, bucket - max_len))], dim=1)
            max_len = bucket
            rope_len = -(-max(rope_len, bucket) // _LENGTH_BUCKET) * _LENGTH_BUCKET
            self.cache, self.static_mask, self.write_index, self._rope_table = self._static_buffers(batch, max_len, rope_len, dtype,
                                                                                                   device)
            self.compiled = _compiled_step(device)
        else:
            self.cache = StaticKVCache(len(self.weights.layers), batch, self.kv_heads, max_len, self.head_dim, dtype, device)
            self._rope_table = self._rope_tables(rope_len, dtype, device) if static_rope else None
        self.key_ok = key_mask.bool()
        # One decode mask for the whole call (sliced per step); none at all without padding.
        self.decode_mask = None
        if not bool(self.key_ok.all()):
            self.decode_mask = torch.zeros(key_mask.shape, dtype=dtype, device=device).masked_fill_(~self.key_ok, float("-inf"))[:, None, None, :]

    def _rope_tables(self, length: int, dtype, device) -> tuple:
        """cos and sign-folded sin for positions 0..length-1, (length, head_dim) each, and the
        M-RoPE axis each column reads (None for 1-D positions). An M-RoPE module given 1-D
        positions puts the same position on every axis, so its table is the 1-D one."""
        probe = torch.empty(0, dtype=dtype, device=device)
        cos, sin = self.model.rotary_emb(probe, position_ids=torch.arange(length, device=device)[None])
        return cos[0], _signed_sin(sin[0]), self._axis

    def _static_buffers(self, batch: int, max_len: int, rope_len: int, dtype, device):
        """Cache, mask, write position and rotary tables of the compiled step. The last set is
        kept with the weights and reused by the next call of the same shape, so a CUDA graph finds
        its inputs at the addresses it was recorded with. On CUDA these and the weights are marked
        static: a graph copies every other input into its own memory at each replay."""
        key = (batch, max_len, rope_len, dtype, torch.device(device))
        held = self.weights.static_buffers
        if held is not None and held[0] == key:
            cache, mask, write_index, rope = held[1]
            cache.length = 0
            for t in cache.keys + cache.values:
                t.zero_()
        else:
            self.weights.static_buffers = None  # free the previous shape's buffers first
            cache = StaticKVCache(len(self.weights.layers), batch, self.kv_heads, max_len, self.head_dim, dtype, device,
                                  zeroed=True)
            mask = torch.empty((batch, 1, 1, max_len), dtype=dtype, device=device)
            write_index = torch.zeros(1, dtype=torch.long, device=device)
            rope = self._rope_tables(rope_len, dtype, device)
            if torch.device(device).type == "cuda":
                for t in cache.keys + cache.values + [mask, write_index, *rope[:2], *self.weights.tensors()]:
                    torch._dynamo.mark_static_address(t)
            self.weights.static_buffers = (key, (cache, mask, write_index, rope))
        mask.fill_(float("-inf"))  # future columns start masked and are opened as they are written
        return cache, mask, write_index, rope

    def _rope(self, embeds: torch.Tensor, position_ids: torch.Tensor):
        if self._rope_table is not None:
            return _rope_at(self._rope_table, position_ids)
        cos, sin = self.model.rotary_emb(embeds, position_ids=position_ids)
        return cos, _signed_sin(sin)

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

    def forward_last(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Run `embeds` (B, T, D) as the next T positions; the final-norm hidden state of the
        last position (B, D). Only the last position's output is computed in the last layer."""
        T = embeds.shape[1]
        cache = self.cache
        start, end = cache.length, cache.length + T
        cos, signed_sin = self._rope(embeds, position_ids)
        cos, signed_sin = cos.unsqueeze(2), signed_sin.unsqueeze(2)  # (B, T, 1, hd)
        mask = self._mask(T, start, end, embeds.device)

        def store_kv(i, keys, values):
            cache.keys[i][:, :, start:end] = keys
            cache.values[i][:, :, start:end] = values
            return cache.keys[i][:, :, :end], cache.values[i][:, :, :end]

        x = embeds
        dims = (self.heads, self.kv_heads, self.head_dim)
        last = len(self.weights.layers) - 1
        for i, w in enumerate(self.weights.layers):
            x = _decoder_layer(x, i, w, cos, signed_sin, dims, self.scaling, self.act, mask, store_kv, first=i == 0,
                               last_only=i == last)
        cache.length = end
        return self.weights.final_norm(x[:, -1])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.weights.head(hidden)

    def step_logits(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) for the last of the next T positions. Single-token steps go through the
        compiled graph when the decoder was built with `compile=True`; prompts never do (their
        length varies, and they run once per call)."""
        T = embeds.shape[1]
        if self.compiled is None or T != 1:
            logits = self.logits(self.forward_last(embeds, position_ids))
            if self.compiled is not None:  # open the prompt's real columns
                self.static_mask[:, 0, 0, : self.cache.length].masked_fill_(self.key_ok[:, : self.cache.length], 0.0)
            return logits
        column = self.cache.length
        self.static_mask[:, 0, 0, column] = 0.0
        self.write_index.fill_(column)
        logits = self._run_compiled(embeds, position_ids)
        self.cache.length = column + 1
        return logits

    def _run_compiled(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        w = self.weights
        return self.compiled(
            embeds, position_ids, self.write_index, self.static_mask, self.cache.keys, self.cache.values,
            w.layers, w.final_norm, w.head, self._rope_table, (self.heads, self.kv_heads, self.head_dim), self.scaling,
            # In place on a view of gate|up, the graph would scatter the whole tensor back
            # (measured: batch 32 ran 1.4x slower), so the graph gets the out-of-place SiLU.
            F.silu if self.act is _silu_ else self.act,
        )


# Cache lengths of compiled decoders are rounded up to this, so one graph serves many calls.
_LENGTH_BUCKET = 128


def _decode_one(x, position_ids, write_index, mask, keys, values, layers, final_norm, head, rope_table, dims, scaling,
                act):
    """Logits for one token per row, with fixed shapes: `LeanDecoder.forward_last` for T = 1 as the
    compiled graph sees it (the cache written at the tensor position `write_index`, attention over
    the whole cache with `mask` hiding unwritten and padded columns). The weights arrive as inputs,
    so rebuilt weights reuse the graph."""
    cos, signed_sin = _rope_at(rope_table, position_ids)
    cos, signed_sin = cos.unsqueeze(2), signed_sin.unsqueeze(2)

    def store_kv(i, new_keys, new_values):
        keys[i].index_copy_(2, write_index, new_keys)
        values[i].index_copy_(2, write_index, new_values)
        return keys[i], values[i]

    for i, w in enumerate(layers):
        x = _decoder_layer(x, i, w, cos, signed_sin, dims, scaling, act, mask, store_kv, first=i == 0)
    return head(final_norm(x[:, -1]))


_COMPILED: dict[str, object] = {}


def _compiled_step(device) -> object:
    """The single-token decode step, compiled once per device type: fixed shapes, the cache written
    with index_copy_ at a tensor position (no recompilation per step), attention over the whole
    cache under a mask. On CUDA this is captured as a CUDA graph ("reduce-overhead")."""
    kind = torch.device(device).type
    if kind not in _COMPILED:
        mode = "reduce-overhead" if kind == "cuda" else None
        _COMPILED[kind] = torch.compile(_decode_one, fullgraph=True, dynamic=False, mode=mode)
    return _COMPILED[kind]
