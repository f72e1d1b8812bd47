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
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from vlmkit.model.connectors._layers import Attention, FeedForward, FFNKind, NormKind, make_norm, resolve_heads
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


def _vlm_base():
    from vlmkit.model.vlm import VisionLanguageModel

    return VisionLanguageModel


def group_memory(memory: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, seen_before: torch.Tensor | None = None):
    """Per-sample memory and per-query visibility from the image markers in `input_ids`.

    memory: (images, M, D) in marker order (row-major over the batch). Returns
    (B, K*M, D) memory, (B, L, K*M) mask, and the marker count per sample, where K is the most
    images any sample has. `seen_before` counts markers in earlier (cached) chunks.
    """
    is_marker = input_ids == image_token_id
    b, length = input_ids.shape
    counts = is_marker.sum(1)
    total = counts if seen_before is None else counts + seen_before
    n_images, m, d = memory.shape
    if int(total.sum()) != n_images:
        raise ValueError(f"the text has {int(total.sum())} image markers but {n_images} images were given")
    k = max(int(total.max()), 1)
    grouped = memory.new_zeros(b, k, m, d)
    valid = torch.zeros(b, k, dtype=torch.bool, device=memory.device)
    start = 0
    for i in range(b):
        n = int(total[i])
        grouped[i, :n] = memory[start : start + n]
        valid[i, :n] = True
        start += n
    seen = torch.cumsum(is_marker.long(), dim=1)
    if seen_before is not None:
        seen = seen + seen_before[:, None]
    # Image j of a sample is visible from its marker onwards.
    visible = torch.arange(k, device=memory.device)[None, None, :] < seen[:, :, None]
    visible = visible & valid[:, None, :]
    mask = visible[..., None].expand(b, length, k, m).reshape(b, length, k * m)
    return grouped.reshape(b, k * m, d), mask, total


class CrossAttentionVLM(_vlm_base()):
    """A VisionLanguageModel whose images reach the LLM through gated cross-attention."""

    @classmethod
    def build(cls, config, pretrained: bool = True) -> "CrossAttentionVLM":
        from vlmkit.model.connectors import build_connector
        from vlmkit.model.language import build_language_model
        from vlmkit.model.vision import build_vision_tower

        options = dict(config.connector.options)
        xattn = parse_cross_attention_options(options.pop("cross_attention", None))
        vision = build_vision_tower(config.vision, pretrained=pretrained)
        llm, tokenizer = build_language_model(config.llm, pretrained=pretrained)
        grid = vision.grid(config.processor.image_size)
        llm_dim = llm.get_input_embeddings().embedding_dim
        connector = build_connector(config.connector.name, vision.hidden_size, llm_dim, options, grid=grid)
        pretrained_parts = set()
        if pretrained and not config.vision.name.endswith("random"):
            pretrained_parts.add("vision")
        if pretrained and not config.llm.name.endswith("random"):
            pretrained_parts.add("llm")
        return cls(config, vision, connector, llm, tokenizer, pretrained_parts, xattn)

    def __init__(self, config, vision, connector, llm, tokenizer, pretrained_parts, xattn: CrossAttentionOptions):
        super().__init__(config, vision, connector, llm, tokenizer, pretrained_parts)
        memory_dim = getattr(connector, "out_dim", connector.llm_dim)
        self.cross_attention = CrossAttentionFusion(llm, memory_dim, xattn)

    def parts(self) -> dict[str, nn.Module]:
        return {**super().parts(), "cross_attention": self.cross_attention}

    @property
    def tokens_per_image(self) -> int:
        # One marker slot per image; the visual tokens live in the cross-attention memory.
        return 1

    @property
    def memory_tokens_per_image(self) -> int:
        return self.connector.num_tokens(self.image_grid)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None, keep_memory: bool = False) -> torch.Tensor:
        """Marker slots get the marker embedding; the image memory goes to the blocks.

        `image_embeds` is the connector output (images, M, D) in marker order. It stays set for
        the decoder calls that follow (generation runs the decoder itself after `embed`), until
        the next `embed` replaces or clears it.
        """
        markers = int((input_ids == self.image_token_id).sum())
        if image_embeds is not None:
            grouped, mask, _ = group_memory(image_embeds, input_ids, self.image_token_id)
            self.cross_attention.set_memory(grouped, mask)
        elif not keep_memory:
            self.cross_attention.set_memory(None)
        if markers and image_embeds is None:
            raise ValueError(f"the text has {markers} image markers but no images were given")
        marker_embeds = self.cross_attention.image_marker.expand(markers, 1, -1) if markers else None
        return super().embed(input_ids, marker_embeds)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
    ):
        from vlmkit.model.vlm import VLMOutput, run_decoder, supervised_loss

        if image_features is None and pixel_values is not None and pixel_values.numel():
            image_features = self.vision_features(pixel_values)
        memory = self.project(image_features.to(self.device)) if image_features is not None else None
        # Later decoding steps carry no images: they keep the memory the prompt set.
        embeds = self.embed(input_ids, memory, keep_memory=memory is None and past_key_values is not None)
        try:
            out = run_decoder(self.llm.base_model, embeds, attention_mask, position_ids, past_key_values, use_cache)
        finally:
            if not use_cache:
                self.cross_attention.set_memory(None)
        hidden = out.last_hidden_state
        head = self.llm.get_output_embeddings()
        if labels is None:
            cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
            return VLMOutput(loss=None, logits=head(hidden), past_key_values=cache if use_cache else None)
        loss, count = supervised_loss(hidden, labels, head)
        return VLMOutput(loss=loss, logits=None, num_supervised=count)
