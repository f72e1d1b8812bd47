"""Cross-attention fusion (Flamingo, Llama 3.2 Vision): gated blocks inside any HF decoder.

Gated cross-attention blocks run before every k-th decoder layer. The decoder layers are found
by attribute path (`model.layers`, see `decoder_layers`) and the blocks are attached with
forward pre-hooks, so no per-model code is needed, the LLM's own modules and state dict are
untouched, and the blocks live outside the LLM as their own trainable part ("cross_attention").

Queries come from the LLM's hidden states, keys/values from the connector's image memory; the
image features never enter the self-attention stack. Each image occupies one marker slot in the
text (filled with a learned marker embedding), which tells which sample an image belongs to and
where it appears: a text token attends only to images whose marker is at or before it.

Every block is `x + tanh(g_attn) * attn(x, memory)` then `x + tanh(g_ffn) * ffn(x)` with both
gates initialised at 0, so at initialisation the LLM computes exactly what it computed before.

`layers: llm` uses the LLM's own gated cross-attention layers instead of added blocks (Llama 3.2
Vision's decoder, `mllama-text`). Such an LLM declares `OwnCrossAttentionLayers`: which memory
each token reads (its own visibility rule) and the decoder inputs that carry memory and mask; a
pre-hook on the decoder passes them. The decoder caches the image keys/values itself: decoding
steps pass no memory, only the last prompt token's mask row.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from vlmkit.model.connectors.layers import Attention, FeedForward, FFNKind, NormKind, make_norm, resolve_heads
from vlmkit.model.language import decoder_layers


class CrossAttentionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # A block before layer i whenever (i + 1) % every == 0: Flamingo's placement, and Llama 3.2
    # Vision's (its cross-attention layers 3, 8, 13 ... sit after every 4 self-attention layers).
    every: int = Field(default=4, ge=1)
    heads: int | None = None  # default: the LLM's query heads
    kv_heads: int | None = None
    head_dim: int | None = None
    ffn: FFNKind = "gelu"
    ffn_hidden: int | None = None  # default 4x the LLM width
    norm: NormKind = "layernorm"
    norm_eps: float = 1e-5
    qk_norm: bool = False
    bias: bool = False
    layers_path: str | None = None
    gate_init: float = 0.0
    # "added": vlmkit's gated blocks (the options above); "llm": the LLM's own cross-attention
    # layers (Llama 3.2 Vision's `mllama-text`), which take none of the options above.
    layers: Literal["added", "llm"] = "added"


def parse_cross_attention_options(raw: dict | None) -> CrossAttentionOptions:
    try:
        return CrossAttentionOptions.model_validate(raw or {})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ValueError(f"cross-attention fusion: invalid options: {problems}") from None


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, memory_dim: int, o: CrossAttentionOptions, heads: int):
        super().__init__()
        head_dim, kv_heads = resolve_heads(dim, heads, o.head_dim, o.kv_heads, "cross-attention")
        self.attn_norm = make_norm(o.norm, dim, o.norm_eps)
        self.attn = Attention(dim, memory_dim, heads, head_dim, kv_heads, bias=o.bias, qk_norm=o.qk_norm, norm_eps=o.norm_eps)
        self.attn_gate = nn.Parameter(torch.full((1,), o.gate_init))
        self.ffn_norm = make_norm(o.norm, dim, o.norm_eps)
        self.ffn = FeedForward(dim, o.ffn_hidden or 4 * dim, o.ffn, bias=o.bias)
        self.ffn_gate = nn.Parameter(torch.full((1,), o.gate_init))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask: (B, Lq, M) or (B, M), True where a query may read a memory token."""
        sees = None
        if mask is not None:
            if mask.dim() == 2:
                mask = mask[:, None, :].expand(-1, x.shape[1], -1)
            # A token with no visible image skips the whole block, FFN included (as Llama 3.2
            # Vision does), so text-only rows compute exactly what the LLM alone computes; an
            # all-masked softmax would also be NaN, and 0 * NaN would break the no-op at init.
            sees = mask.any(-1, keepdim=True)
            mask = mask | ~sees
        attn = self.attn(self.attn_norm(x), memory, mask)
        if sees is not None:
            attn = attn * sees.to(x.dtype)
        x = x + torch.tanh(self.attn_gate).to(x.dtype) * attn
        ffn = self.ffn(self.ffn_norm(x))
        if sees is not None:
            ffn = ffn * sees.to(x.dtype)
        return x + torch.tanh(self.ffn_gate).to(x.dtype) * ffn


def insertion_points(num_layers: int, every: int) -> list[int]:
    return [i for i in range(num_layers) if (i + 1) % every == 0]


class CrossAttentionFusion(nn.Module):
    """The blocks, plus the hooks that run them inside a decoder."""

    def __init__(self, llm: nn.Module, memory_dim: int, options: CrossAttentionOptions):
        super().__init__()
        cfg = llm.config
        dim = llm.get_input_embeddings().embedding_dim
        heads = options.heads or getattr(cfg, "num_attention_heads", None)
        if heads is None:
            raise ValueError("cross-attention fusion: set options.heads (the LLM config does not say)")
        self.options = options
        layers = decoder_layers(llm, options.layers_path)
        self.points = insertion_points(len(layers), options.every)
        if not self.points:
            raise ValueError(f"cross-attention fusion: every={options.every} inserts no block into {len(layers)} decoder layers")
        self.blocks = nn.ModuleList(GatedCrossAttentionBlock(dim, memory_dim, options, heads) for _ in self.points)
        # Fills each image's single slot in the text sequence (the position marker).
        self.image_marker = nn.Parameter(torch.randn(dim) * 0.02)
        self._memory: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._handles = []
        for block_index, layer_index in enumerate(self.points):
            self._handles.append(layers[layer_index].register_forward_pre_hook(self._make_hook(block_index), with_kwargs=True))

    def _make_hook(self, block_index: int):
        def hook(module, args, kwargs):
            if self._memory is None:
                return None
            block = self.blocks[block_index]
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = self._mask
            if mask is not None and mask.shape[1] != hidden.shape[1]:
                # Cached decoding: new tokens come after the whole prompt, so they see what its
                # last token saw.
                mask = mask[:, -1:, :]
            if args:
                return (block(args[0], self._memory, mask),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = block(kwargs["hidden_states"], self._memory, mask)
            return args, kwargs

        return hook

    def set_memory(self, memory: torch.Tensor | None, mask: torch.Tensor | None = None) -> None:
        self._memory, self._mask = memory, mask

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def group_memory(memory: list[torch.Tensor] | torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                 seen_before: torch.Tensor | None = None):
    """Per-sample memory and per-query visibility from the image markers in `input_ids`.

    memory: one (M_i, D) tensor per image in marker order (row-major over the batch); images may
    differ in length (Llama 3.2 Vision tiles), shorter ones are padded and masked. Returns
    (B, K*M, D) memory, (B, L, K*M) mask, and the marker count per sample, where K is the most
    images any sample has and M the longest image. `seen_before` counts markers in earlier
    (cached) chunks.
    """
    memory = list(memory)
    is_marker = input_ids == image_token_id
    b, length = input_ids.shape
    counts = is_marker.sum(1)
    total = counts if seen_before is None else counts + seen_before
    n_images = len(memory)
    if int(total.sum()) != n_images:
        raise ValueError(f"the text has {int(total.sum())} image markers but {n_images} images were given")
    m = max(x.shape[0] for x in memory)
    d = memory[0].shape[-1]
    k = max(int(total.max()), 1)
    grouped = memory[0].new_zeros(b, k, m, d)
    valid = torch.zeros(b, k, m, dtype=torch.bool, device=memory[0].device)
    start = 0
    for i in range(b):
        for j in range(int(total[i])):
            image = memory[start + j]
            grouped[i, j, : image.shape[0]] = image
            valid[i, j, : image.shape[0]] = True
        start += int(total[i])
    seen = torch.cumsum(is_marker.long(), dim=1)
    if seen_before is not None:
        seen = seen + seen_before[:, None]
    # Image j of a sample is visible from its marker onwards.
    visible = torch.arange(k, device=grouped.device)[None, None, :] < seen[:, :, None]
    mask = visible[..., None] & valid[:, None, :, :]
    return grouped.reshape(b, k * m, d), mask.reshape(b, length, k * m), total


# ---- the LLM's own cross-attention layers ----------------------------------------------------


class OwnCrossAttentionLayers:
    """What an LLM whose decoder has its own cross-attention layers declares, for `layers: llm`
    fusion (its family mixes it into the causal-LM class it builds; Llama 3.2 Vision's
    `mllama-text`): which memory each token reads, and the decoder's keyword inputs that carry
    the memory and that visibility."""

    def cross_attention_memory(self, tokens: list[torch.Tensor], images: list | None, input_ids: torch.Tensor,
                               image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, D) memory and (B, L, M) visibility (True where a token reads a memory row) from
        each image's tokens (in marker order), its processed image, and the prompt's markers."""
        raise NotImplementedError

    def cross_attention_inputs(self, memory: torch.Tensor | None, visible: torch.Tensor, dtype: torch.dtype) -> dict:
        """The decoder's keyword inputs for `memory` (None while decoding: the layers cached its
        keys/values) and (B, L, M) `visible`."""
        raise NotImplementedError


class LLMCrossAttention(nn.Module):
    """Feeds the image memory to an LLM whose decoder has its own cross-attention layers
    (`OwnCrossAttentionLayers`), through a pre-hook on the decoder. Holds no weights: those layers
    belong to the LLM (and train, adapt and save with it)."""

    def __init__(self, llm: nn.Module, options: CrossAttentionOptions):
        super().__init__()
        set_options = sorted(k for k in options.model_fields_set if k != "layers")
        if set_options:
            raise ValueError(f"cross-attention fusion with layers: llm uses the LLM's own layers; {set_options} only "
                             "apply to added blocks (layers: added)")
        if not isinstance(llm, OwnCrossAttentionLayers):
            raise ValueError(f"cross-attention fusion with layers: llm needs an LLM with its own cross-attention layers "
                             f"(Llama 3.2 Vision's mllama-text); {type(llm).__name__} has none: use layers: added")
        self.options = options
        # The LLM's methods, not the LLM: a module attribute would make it a submodule of this one.
        self._layout, self._inputs = llm.cross_attention_memory, llm.cross_attention_inputs
        self._memory: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._fresh = False
        self._handles = [llm.base_model.register_forward_pre_hook(self._hook, with_kwargs=True)]

    def read_images(self, tokens: list[torch.Tensor], images: list | None, input_ids: torch.Tensor, image_token_id: int) -> None:
        """Set the memory and visibility the LLM lays out for these images and this prompt."""
        self.set_memory(*self._layout(tokens, images, input_ids, image_token_id))

    def set_memory(self, memory: torch.Tensor | None, mask: torch.Tensor | None = None) -> None:
        self._memory, self._mask, self._fresh = memory, mask, memory is not None

    def consumed(self) -> None:
        """The decoder cached the memory's keys/values: later (cached) steps pass none."""
        self._fresh = False

    def _hook(self, module, args, kwargs):
        if self._memory is None and self._mask is None:
            return None
        hidden = kwargs.get("inputs_embeds")
        n = hidden.shape[1]
        if self._fresh:
            states, visible = self._memory, self._mask
            if visible.shape[1] != n:
                raise ValueError(f"cross-attention mask covers {visible.shape[1]} tokens, the decoder reads {n}")
        else:  # decoding: new tokens read what the prompt's last token read, from the cached keys/values
            states, visible = None, self._mask[:, -1:].expand(-1, n, -1)
        return args, dict(kwargs, **self._inputs(states, visible, hidden.dtype))

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
