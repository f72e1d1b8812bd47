"""A training forward of the decoder that computes only what the loss reads.

A causal decoder's loss reads the final hidden states at the supervised positions alone. Under
causal attention nothing after the last of them matters, and in the last layer only their rows
need a query, an attention output and an MLP (every earlier position still gives its key and
value). For a VLM sample, where the answer is a short tail after the image and the question,
that is most of the last layer's work; transformers computes it for every position.

The layers run here on their own modules, with the projections that read the same input
grouped: q, k and v as one matmul over their stacked weights, gate and up as another, each LoRA
adapter's `A` for the group as one matmul too, its scaling applied to the narrow (rows x r)
product and its `B` added into the base output by `addmm`. On one CPU thread the grouping
measures level with separate matmuls (the stacking copies cost what the fewer calls save); it
means fewer, larger kernels on a GPU. The maths is the transformers layer's (pre-norm, rotary
positions, SDPA); results equal transformers' to float rounding.

It runs for decoders of the plain pre-norm shape only (`LEAN_LAYERS`: Llama, Mistral, Qwen2,
Qwen2-VL's and Qwen2.5-VL's M-RoPE text models), full attention, unpacked rows, no cache, no
hooks on the layers (DeepStack injections), no gradient checkpointing, and linear layers that
are plain or carry one unmerged peft LoRA adapter without dropout; `lean_decoder` says None
otherwise and the caller takes the ordinary path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# transformers decoder layer classes of the plain pre-norm shape this forward reproduces.
LEAN_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen2VLDecoderLayer",
                         "Qwen2_5_VLDecoderLayer"})


def foreign_hooks(module: nn.Module) -> bool:
    """Whether `module` has forward hooks other than transformers' own output recorders (idle
    unless hidden states or attentions are asked for): DeepStack's injections, FSDP's gathers."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return any(getattr(h, "__name__", "") != "output_capturing_hook" for h in hooks)


def _linear(module: nn.Module):
    """(weight, bias, (A, B, scale) or None) of a plain linear or a peft LoRA linear with one
    active adapter, unmerged, no dropout, no DoRA; None when it is neither."""
    if type(module) is nn.Linear:
        return module.weight, module.bias, None
    base = getattr(module, "base_layer", None)
    if type(base) is not nn.Linear or getattr(module, "merged", True) or getattr(module, "disable_adapters", True):
        return None
    active = list(module.active_adapters)
    if len(active) != 1:
        return None
    name = active[0]
    if (name not in module.lora_A or module.use_dora.get(name) or not isinstance(module.lora_dropout[name], nn.Identity)
            or type(module.lora_A[name]) is not nn.Linear or module.lora_A[name].bias is not None
            or type(module.lora_B[name]) is not nn.Linear or module.lora_B[name].bias is not None):
        return None
    return base.weight, base.bias, (module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name]))


def _supported_layer(layer: nn.Module) -> bool:
    if type(layer).__name__ not in LEAN_LAYERS or any(foreign_hooks(m) for m in (layer, layer.self_attn, layer.mlp)):
        return False
    attn, mlp = layer.self_attn, layer.mlp
    if getattr(attn, "sliding_window", None) or getattr(attn, "attention_dropout", 0.0) and layer.training:
        return False
    if type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLUActivation", "SiLU"):
        return False
    names = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return all(_linear(m) is not None and not foreign_hooks(m) for m in names)


def lean_decoder(decoder: nn.Module, attention_mask, position_ids) -> bool:
    """Whether `supervised_hidden` can run `decoder` (a transformers decoder stack) on this batch:
    a (B, T) padding mask (none: packed rows), 1-D or 3-row M-RoPE positions."""
    if attention_mask is None or attention_mask.ndim != 2 or position_ids is None:
        return False
    if position_ids.ndim == 3 and position_ids.shape[0] != 3:
        return False
    if getattr(decoder, "gradient_checkpointing", False) or not hasattr(decoder, "rotary_emb") or foreign_hooks(decoder):
        return False
    if not type(getattr(decoder, "norm", None)).__name__.endswith("RMSNorm"):
        return False
    return all(_supported_layer(layer) for layer in decoder.layers)


def fused_linears(x: torch.Tensor, modules: list[nn.Module]) -> list[torch.Tensor]:
    """Each module's output on the same `x` (…, in), the group's base weights and adapters' `A`
    each applied as one matmul."""
    parts = [_linear(m) for m in modules]
    shape = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    weights = [w for w, _, _ in parts]
    biases = [b if b is not None else w.new_zeros(w.shape[0]) for w, b, _ in parts]
    has_bias = any(b is not None for _, b, _ in parts)
    if len(parts) == 1:
        base = F.linear(flat, weights[0], parts[0][1])
    else:
        base = F.linear(flat, torch.cat(weights), torch.cat(biases) if has_bias else None)
    adapted = [p[2] for p in parts]
    sizes = [w.shape[0] for w in weights]
    outs = list(base.split(sizes, dim=-1)) if len(parts) > 1 else [base]
    loras = [(i, a) for i, a in enumerate(adapted) if a is not None]
    if loras:
        narrow = F.linear(flat, torch.cat([a for _, (a, _, _) in loras])) if len(loras) > 1 else F.linear(flat, loras[0][1][0])
        pieces = narrow.split([a.shape[0] for _, (a, _, _) in loras], dim=-1)
        for (i, (_, b, scale)), piece in zip(loras, pieces, strict=True):
            outs[i] = torch.addmm(outs[i], piece * scale, b.t())
    return [o.reshape(*shape, o.shape[-1]) for o in outs]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _attention(layer, h: torch.Tensor, cos, sin, mask, queries: slice) -> torch.Tensor:
    """The layer's self-attention output for the positions `queries` of `h` (B, T, C), keys and
    values from every position."""
    attn = layer.self_attn
    b, t, _ = h.shape
    d = attn.head_dim
    if queries.start == 0:
        q, k, v = fused_linears(h, [attn.q_proj, attn.k_proj, attn.v_proj])
    else:
        k, v = fused_linears(h, [attn.k_proj, attn.v_proj])
        (q,) = fused_linears(h[:, queries], [attn.q_proj])
    tq = q.shape[1]
    q = _rotate(q.view(b, tq, -1, d).transpose(1, 2), cos[:, None, queries], sin[:, None, queries])
    k = _rotate(k.view(b, t, -1, d).transpose(1, 2), cos[:, None], sin[:, None])
    v = v.view(b, t, -1, d).transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    if mask is None and queries.start == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=gqa)
    else:
        # SDPA's is_causal aligns a shorter query block to the first keys; the mask says where it is.
        mask = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()[None, None] if mask is None else mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, :, queries], scale=attn.scaling, enable_gqa=gqa)
    (o,) = fused_linears(out.transpose(1, 2).reshape(b, tq, -1), [attn.o_proj])
    return o


def _layer(layer, x: torch.Tensor, cos, sin, mask, queries: slice) -> torch.Tensor:
    """A pre-norm decoder layer; its output at the positions `queries` only."""
    o = _attention(layer, layer.input_layernorm(x), cos, sin, mask, queries)
    x = x[:, queries] + o
    mlp = layer.mlp
    gate, up = fused_linears(layer.post_attention_layernorm(x), [mlp.gate_proj, mlp.up_proj])
    (down,) = fused_linears(F.silu(gate) * up, [mlp.down_proj])
    return x + down


def _mask(attention_mask: torch.Tensor, t: int) -> torch.Tensor | None:
    """(B, 1, T, T) bool attention mask, or None where every row is full (plain causal). A
    padding query attends to itself too, so that no row is all masked (its output is never read)."""
    valid = attention_mask[:, :t].bool()
    if bool(valid.all()):
        return None
    causal = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
    allowed = valid[:, None, :] | ~valid[:, :, None] & torch.eye(t, dtype=torch.bool, device=valid.device)
    return (causal & allowed)[:, None]


def supervised_hidden(decoder: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                      read: torch.Tensor) -> torch.Tensor:
    """The decoder's final hidden states at the positions `read` ((B, T) bool), as `(N, C)` rows
    in row-major order: `decoder(...).last_hidden_state[read]`, with only the work they need.
    `read` holds at least one position."""
    cols = read.any(0).nonzero().flatten()
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    x = embeds[:, :hi]
    positions = position_ids[..., :hi]
    cos, sin = decoder.rotary_emb(x, positions)
    mask = _mask(attention_mask, hi)
    layers = list(decoder.layers)
    for layer in layers[:-1]:
        x = _layer(layer, x, cos, sin, mask, slice(0, hi))
    x = _layer(layers[-1], x, cos, sin, mask, slice(lo, hi))
    return decoder.norm(x)[read[:, lo:hi]]
