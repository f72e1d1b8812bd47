"""Assembly: vision tower -> connector -> family assembler -> fusion into the language model.

The processor describes every image as views (tiles, thumbnail, native-resolution patches,
temporal patches) with their sizes and grids, plus an arrangement (`processing.base`). The model
encodes each view at its own grid, projects it with the connector, lets the family's assembler
place the tokens (AnyRes stitching, unpadding and row newlines), and hands the result to the
fusion strategy named in the config:

* `prefix`: the prompt holds one image token per visual token; their embeddings are replaced by
  the image tokens, in order.
* `cross-attention`: each image has one marker slot in the text; its tokens become the memory of
  gated cross-attention blocks inside the LLM (`model/cross_attention.py`).

The processor promised how many slots each image takes; the model checks that promise when it is
built (on probe images, so a processor family its connector cannot consume is refused before any
batch) and again on every batch, and never truncates image tokens.

`forward` returns the LLM's final hidden states and its cache; losses (`train/losses.py`) and
generation (`generate.py`) read those, so training, evaluation and serving share one forward.
"""

from __future__ import annotations

import functools
import inspect
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from vlmkit.config import ModelConfig
from vlmkit.core.types import IGNORE_INDEX  # noqa: F401  (re-exported)
from vlmkit.model.assembly import assembler
from vlmkit.model.attention import attention_rule, decoder_mask
from vlmkit.model.connectors import build_connector
from vlmkit.model.cross_attention import (
    CrossAttentionFusion,
    LLMCrossAttention,
    group_memory,
    parse_cross_attention_options,
)
from vlmkit.model.deepstack import LevelInjection
from vlmkit.model.feature_pool import pool_features, pooled_grid
from vlmkit.model.language import build_language_model, position_rule
from vlmkit.model.lean_train import lean_decoder, supervised_hidden
from vlmkit.model.loss import next_token_loss
from vlmkit.model.vision import build_vision_tower
from vlmkit.processing import build_image_processor
from vlmkit.processing.base import VisualBatch
from vlmkit.registry import Registry

PARTS = ("vision", "connector", "llm", "cross_attention")

# Image sizes (as multiples of the processor's base size) on which a new model checks that its
# processor's promised slots equal what it produces: square, wide, tall, small.
PROBE_SIZES = ((1.0, 1.0), (2.0, 1.0), (0.75, 2.25), (0.4, 0.3))


@dataclass
class VLMOutput:
    hidden_states: torch.Tensor | None
    past_key_values: object | None = None
    loss: torch.Tensor | None = None
    num_supervised: int = 0
    head: nn.Module | None = field(default=None, repr=False)

    @property
    def logits(self) -> torch.Tensor:
        """LM-head output over every position (computed on request: training never needs it)."""
        return self.head(self.hidden_states)


class TransformedHead:
    """An LM head with the output transform its causal LM's forward applies after it: the logits
    times `scale` (Cohere's `logit_scale`; 1 / Granite's `logits_scaling`), then soft-capped,
    cap * tanh(logits / cap) (Gemma 2's `final_logit_softcapping`). vlmkit runs the decoder and
    applies the head itself, never the causal LM's forward, so the transform is applied here."""

    def __init__(self, head: nn.Module, scale: float = 1.0, cap: float | None = None):
        self.head, self.scale, self.cap = head, float(scale), float(cap) if cap else None

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        return logits if self.cap is None else torch.tanh(logits / self.cap) * self.cap


def lm_head(llm: nn.Module):
    """The LLM's output layer as its own forward applies it: the bare head, or a
    `TransformedHead` where the LLM's config declares a logit scale or soft-capping."""
    head = llm.get_output_embeddings()
    config = getattr(llm, "config", None)  # a transformers config; vlmkit's own LLMs have one too
    scale = float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
    cap = getattr(config, "final_logit_softcapping", None)
    return TransformedHead(head, scale, cap) if scale != 1.0 or cap else head


# ---- fusion strategies ------------------------------------------------------------------------

FUSIONS: Registry = Registry("fusion")


class PrefixFusion:
    """Visual tokens fill the image-token slots of the input sequence. Where the connector
    declares `feature_levels` (DeepStack), the tokens' extra levels are added after the first
    decoder layers (`model/deepstack.py`)."""

    name = "prefix"
    module: nn.Module | None = None

    def __init__(self, levels: LevelInjection | None = None):
        self.levels = levels

    def inputs_embeds(self, model: "VisionLanguageModel", input_ids, image_tokens: list[torch.Tensor] | None, cached: bool,
                      images=None):
        tokens = torch.cat(image_tokens) if image_tokens else None
        if self.levels is None:
            return model.fill_slots(input_ids, tokens)
        width = model.llm.get_input_embeddings().embedding_dim
        first, levels = self.levels.split(tokens, width) if tokens is not None else (None, None)
        self.levels.set(model.slot_mask(input_ids) if tokens is not None else None, levels)
        return model.fill_slots(input_ids, first)

    def after_forward(self, use_cache: bool) -> None:
        if self.levels is not None:
            self.levels.set(None, None)


class CrossAttentionFusionStrategy:
    """Visual tokens are the memory of gated cross-attention blocks; the text holds one marker per image."""

    name = "cross-attention"

    def __init__(self, module: nn.Module):
        self.module = module

    def inputs_embeds(self, model, input_ids, image_tokens, cached: bool, images=None):
        markers = int((input_ids == model.image_token_id).sum())
        if image_tokens:
            grouped, mask, _ = group_memory(image_tokens, input_ids, model.image_token_id)
            self.module.set_memory(grouped, mask)
        elif not cached:
            # Later decoding steps carry no images: they keep the memory the prompt set.
            self.module.set_memory(None)
        if markers and not image_tokens:
            raise ValueError(f"the text has {markers} image markers but no images were given")
        marker = self.module.image_marker
        return model.fill_slots(input_ids, marker.expand(markers, -1) if markers else None)

    def after_forward(self, use_cache: bool) -> None:
        if not use_cache:
            self.module.set_memory(None)


class LLMCrossAttentionStrategy:
    """Visual tokens are the memory of the LLM's own cross-attention layers (Llama 3.2 Vision's),
    laid out and made visible by the LLM's own rule (`OwnCrossAttentionLayers`, which may read the
    processed images); the text holds one image token per image, an ordinary token of the LLM's
    vocabulary."""

    name = "cross-attention"

    def __init__(self, module: nn.Module):
        self.module = module

    def inputs_embeds(self, model, input_ids, image_tokens, cached: bool, images=None):
        markers = int((input_ids == model.image_token_id).sum())
        if image_tokens:
            self.module.read_images(image_tokens, images, input_ids, model.image_token_id)
        elif not cached:
            self.module.set_memory(None)
        if markers and not image_tokens:
            raise ValueError(f"the text has {markers} image markers but no images were given")
        table = model.llm.get_input_embeddings()
        if model.image_token_id >= table.num_embeddings:
            raise ValueError(f"cross-attention layers: llm reads the image token {model.config.image_token!r} (id "
                             f"{model.image_token_id}) from the LLM's embeddings, which have {table.num_embeddings} rows")
        return table(input_ids)

    def after_forward(self, use_cache: bool) -> None:
        if use_cache:
            self.module.consumed()
        else:
            self.module.set_memory(None)


@FUSIONS.register("prefix")
def _prefix(config: ModelConfig, llm, connector, options: dict) -> PrefixFusion:
    if options:
        raise ValueError(f"prefix fusion takes no cross_attention options, got {sorted(options)}")
    return PrefixFusion(LevelInjection(llm, connector.feature_levels) if connector.feature_levels else None)


@FUSIONS.register("cross-attention")
def _cross_attention(config: ModelConfig, llm, connector, options: dict) -> CrossAttentionFusionStrategy:
    parsed = parse_cross_attention_options(options)
    if parsed.layers == "llm":
        return LLMCrossAttentionStrategy(LLMCrossAttention(llm, parsed))
    return CrossAttentionFusionStrategy(CrossAttentionFusion(llm, connector.out_dim, parsed))


# ---- the model ---------------------------------------------------------------------------------

class VisionLanguageModel(nn.Module):
    def __init__(self, config: ModelConfig, vision: nn.Module, connector: nn.Module, llm: nn.Module, tokenizer,
                 pretrained_parts: set[str], fusion=None, image_processor=None):
        super().__init__()
        self.config = config
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.tokenizer = tokenizer
        self.fusion = fusion or PrefixFusion()
        if self.fusion.module is not None:
            self.cross_attention = self.fusion.module
        # Parts whose weights come from files the config names: a checkpoint need not repeat them.
        self.pretrained_parts = set(pretrained_parts)
        self.frozen: set[str] = set()
        # The LoRA spec of the adapters injected into its parts (model/lora.py); None: none.
        self.lora_spec: dict | None = None
        self.image_token_id = ensure_image_token(tokenizer, config.image_token)
        video_token = config.video_token
        # A family's own video slot token (Qwen2-VL's <|video_pad|>); its slots are filled like image slots.
        self.video_token_id = ensure_image_token(tokenizer, video_token) if video_token else None
        self.vocab_size = llm.get_input_embeddings().num_embeddings
        # Tokens the connector embeds itself (its `marker_tokens`), added to the tokenizer where absent.
        self.marker_ids = [ensure_image_token(tokenizer, t) for t in connector.marker_tokens()]
        # How the LLM numbers positions ("1d" or "mrope", declared by the LLM): the chat processor
        # gives M-RoPE prompts their (3, T) positions.
        self.position_rule = position_rule(llm)
        self.image_processor = image_processor
        self.attention_rule = attention_rule(config.attention)
        if self.attention_rule.name != "causal" and self.fusion.name != "prefix":
            raise ValueError(f"attention rule {self.attention_rule.name!r} needs prefix fusion (the images in the sequence)")
        if self.image_token_id < self.vocab_size:
            # The placeholder must never collide with a real token the LM could emit.
            existing = tokenizer.convert_ids_to_tokens(self.image_token_id)
            if existing != config.image_token:
                raise ValueError(f"image token {config.image_token!r} collides with vocabulary entry {existing!r}")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, config: ModelConfig, pretrained: bool = True) -> "VisionLanguageModel":
        vision = build_vision_tower(config.vision, pretrained=pretrained)
        llm, tokenizer = build_language_model(config.llm, pretrained=pretrained)
        grid = vision.grid(config.processor.image_size)
        llm_dim = llm.get_input_embeddings().embedding_dim
        options = dict(config.connector.options)
        fusion_options = options.pop("cross_attention", None) or {}
        connector = build_connector(config.connector.name, vision.hidden_size, llm_dim, options)
        processor = build_image_processor(config, tokens_per_image=_fixed_tokens(connector, grid, config))
        if not processor.native_resolution:
            # Views of a fixed size: the connector must take the base image's feature grid.
            connector.check_grid(grid)
        fusion = FUSIONS.build(config.fusion, config, llm, connector, fusion_options)
        if processor.learned_newline:
            # LLaVA-NeXT's learned row separator; it trains (and is saved) with the connector.
            connector.register_parameter("image_newline", nn.Parameter(torch.randn(llm_dim) / llm_dim**0.5))
        if config.connector.output_norm == "text":
            with torch.no_grad():
                table = llm.get_input_embeddings().weight
                rms = 1.0 if table.is_meta else float(table.float().pow(2).mean(-1).sqrt().mean())
            connector.attach_output_norm(rms)
        pretrained_parts = set()
        # A tower that says its weights are random (qwen2-vit, built from a config) must be saved
        # with every checkpoint, whatever its registry name.
        if pretrained and not config.vision.name.endswith("random") and vision.from_files:
            pretrained_parts.add("vision")
        if pretrained and not config.llm.name.endswith("random"):
            pretrained_parts.add("llm")
        model = cls(config, vision, connector, llm, tokenizer, pretrained_parts, fusion, processor)
        model.check_processor()
        return model

    def parts(self) -> dict[str, nn.Module]:
        parts = {"vision": self.vision, "connector": self.connector, "llm": self.llm}
        if self.fusion.module is not None:
            parts["cross_attention"] = self.fusion.module
        return parts

    @property
    def image_grid(self) -> tuple[int, int]:
        return self.vision.grid(self.config.processor.image_size)

    @property
    def tokens_per_image(self) -> int:
        """Slots one base-size image takes in the text (1 marker under cross-attention)."""
        return 1 if self.fusion.name == "cross-attention" else self.connector.num_tokens(self.image_grid)

    @property
    def memory_tokens_per_image(self) -> int:
        return self.connector.num_tokens(self.image_grid) if self.fusion.name == "cross-attention" else 0

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    # ---- the processor contract ---------------------------------------------------------
    def tower_grid(self, view) -> tuple[int, int, int]:
        """(t, h, w) grid of the tower's features of one view."""
        if (view.role == "patches") != self.vision.reads_patches:
            raise ValueError(
                f"the vision tower {type(self.vision).__name__} reads "
                + ("pre-flattened patches (the qwen2vl processor)" if self.vision.reads_patches else "images, not pre-flattened patches")
            )
        if view.role == "patches":
            return tuple(view.grid)
        if view.role == "frame":
            return (1, *self.vision.frame_grid_hw(*view.size))
        return (1, *self.vision.grid_hw(*view.size))

    def view_grid(self, view) -> tuple[int, int, int]:
        """(t, h, w) grid the connector reads of one view: the tower's, after the view's pooling."""
        t, h, w = self.tower_grid(view)
        return (t, *pooled_grid((h, w), view.pool))

    def count_image_tokens(self, image) -> int:
        """Visual tokens the model makes for one processed image, from grids alone (no forward)."""
        grids, counts = [], []
        for view in image.views:
            t, h, w = self.view_grid(view)
            self.connector.check_grid((h, w))
            grids.append(self.connector.output_grid((h, w)))
            counts.append(t * self.connector.num_tokens((h, w)))
        _, count = assembler(image.arrangement.assembler)
        return count(counts, grids, image.arrangement, image.image_size)

    def image_slots(self, image) -> int:
        """Text slots the image needs: its visual tokens, or one marker under cross-attention."""
        tokens = self.count_image_tokens(image)
        return 1 if self.fusion.name == "cross-attention" else tokens

    def check_processor(self) -> None:
        """Refuse a processor family whose promised slots differ from what this model produces."""
        from PIL import Image

        proc, cfg = self.image_processor, self.config
        base = cfg.processor.image_size
        for fw, fh in PROBE_SIZES:
            w, h = max(1, round(base * fw)), max(1, round(base * fh))
            try:
                with torch.device("cpu"):  # pixels are host tensors, even for a model built on meta
                    image = proc.preprocess(Image.new("RGB", (w, h), (127, 127, 127)))
                made = self.image_slots(image)
            except ValueError as e:
                raise ValueError(
                    f"processor family {cfg.processor.name!r} cannot feed connector {cfg.connector.name!r} "
                    f"(vision tower {cfg.vision.name!r}, {cfg.fusion} fusion) for a {w}x{h} image: {e}"
                ) from None
            if made != image.layout.slots:
                raise ValueError(
                    f"processor family {cfg.processor.name!r} reserves {image.layout.slots} image slots for a {w}x{h} "
                    f"image but connector {cfg.connector.name!r} over vision tower {cfg.vision.name!r} produces {made}; "
                    "pick a connector whose token count matches the family (e.g. pixel-shuffle with the family's "
                    "downsample ratio), or change the processor's options"
                )

    # ---- freezing -----------------------------------------------------------------------
    def set_trainable(self, trainable: list[str] | set[str]) -> None:
        """Train exactly the named parts; frozen parts stay in eval mode (BatchNorm, dropout)."""
        parts = self.parts()
        unknown = set(trainable) - set(parts)
        if unknown:
            raise ValueError(f"this model has no parts {sorted(unknown)}; it has {sorted(parts)}")
        self.frozen = set(parts) - set(trainable)
        for name, module in parts.items():
            for param in module.parameters():
                # QLoRA's packed 4-bit weights are integers: they never train.
                if param.is_floating_point():
                    param.requires_grad_(name not in self.frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "VisionLanguageModel":
        super().train(mode)
        for name in self.frozen:
            self.parts()[name].eval()
        return self

    def trainable_parameters(self) -> dict[str, int]:
        return {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in self.parts().items()}

    # ---- images ---------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor, frames: bool = False) -> torch.Tensor:
        """(images, 3, H, W) of one size -> (images, grid tokens, vision width); `frames`: video
        frames, on the tower's frame path."""
        pixels = pixel_values.to(self.device, dtype=next(self.vision.parameters()).dtype)
        return self.vision.encode_frames(pixels) if frames else self.vision(pixels)

    def view_features(self, images: list) -> list[list[torch.Tensor]]:
        """Tower features of every view of every image: (t, h*w, C) each. Image-shaped views of
        one size run through the tower together, whatever image they belong to."""
        if self.vision.encodes_whole_images:
            # A tower whose views are not independent (Llama 3.2 Vision's tiles) reads each image whole.
            return [self.vision.encode_image(im) for im in images]
        out: list[list[torch.Tensor | None]] = [[None] * len(im.views) for im in images]
        by_size = defaultdict(list)
        patches = []
        for i, im in enumerate(images):
            for j, (view, pixels) in enumerate(zip(im.views, im.view_pixels())):
                if view.role == "patches":
                    patches.append((i, j, pixels.to(self.device), tuple(view.grid)))
                else:
                    by_size[view.role == "frame", tuple(pixels.shape)].append((i, j, pixels))
        if patches:
            for (i, j, _, _), f in zip(patches, self.vision.encode_patch_views([(p, g) for _, _, p, g in patches])):
                out[i][j] = f
        for (frames, _), items in by_size.items():
            feats = self.vision_features(torch.stack([p for _, _, p in items]), frames=frames)
            for (i, j, _), f in zip(items, feats):
                out[i][j] = f.unsqueeze(0)
        return out

    def image_tokens(self, images: list, features: list[list[torch.Tensor]] | None = None) -> list[torch.Tensor]:
        """(visual tokens, LLM width) for each image, assembled by its family."""
        if features is None:
            features = self.view_features(images)
        newline = self.connector.image_newline
        # Views of one grid, from any image, go through the connector together (frames of a
        # video view are rows like any other).
        by_grid = defaultdict(list)
        for i, (image, feats) in enumerate(zip(images, features)):
            for j, (view, f) in enumerate(zip(image.views, feats)):
                if view.pool is not None:
                    f = pool_features(f.to(self.device), self.tower_grid(view)[1:], view.pool)
                by_grid[self.view_grid(view)[1:]].append((i, j, f))
        projected: dict[tuple[int, int], torch.Tensor] = {}
        for grid, items in by_grid.items():
            stacked = torch.cat([f.to(self.device) for _, _, f in items])
            # A connector that reads the instruction gets each row's image's instruction ids.
            extra = ({"texts": [images[i].instruction_ids for i, _, f in items for _ in range(f.shape[0])]}
                     if self.connector.reads_instruction else {})
            rows = self.connector.tokens(stacked, grid, **extra).split([f.shape[0] for _, _, f in items])
            for (i, j, _), r in zip(items, rows):
                projected[i, j] = r.reshape(-1, r.shape[-1])
        out = []
        for i, image in enumerate(images):
            tokens = [projected[i, j] for j in range(len(image.views))]
            grids = [self.connector.output_grid(self.view_grid(v)[1:]) for v in image.views]
            assemble, _ = assembler(image.arrangement.assembler)
            out.append(assemble(tokens, grids, image.arrangement, image.image_size, newline))
        return out

    def slot_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where visual tokens go: image-token slots, and video-token slots where the family has its own."""
        mask = input_ids == self.image_token_id
        video = self.video_token_id
        return mask if video is None else mask | (input_ids == video)

    def fill_slots(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image-token slots filled by `image_embeds` (rows in order)."""
        is_image = self.slot_mask(input_ids)
        markers = self._marker_mask(input_ids) if self.marker_ids and image_embeds is not None else None
        safe_ids = input_ids.masked_fill(is_image if markers is None else is_image | markers.any(-1), 0)
        embeds = self.llm.get_input_embeddings()(safe_ids)
        if markers is not None:
            embeds = self._embed_markers(embeds, markers)
        slots = int(is_image.sum())
        given = 0 if image_embeds is None else image_embeds.reshape(-1, embeds.shape[-1]).shape[0]
        if slots != given:
            raise ValueError(
                f"the prompt has {slots} image-token slots but the images produced {given} visual tokens; "
                "the processor and the model disagree (was an image truncated?)"
            )
        if slots:
            flat = image_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), flat)
        return embeds

    def _marker_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(..., markers) bool: where each of the connector's own tokens stands."""
        ids = torch.tensor(self.marker_ids, device=input_ids.device)
        return input_ids.unsqueeze(-1) == ids

    def _embed_markers(self, embeds: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        """The connector's rows at its marker tokens (transformers' Ovis2 does so only when the
        call has images; later decoding steps embed them as text)."""
        rows = self.connector.marker_embeddings().to(embeds.dtype)
        own = markers.to(embeds.dtype) @ rows
        return torch.where(markers.any(-1, keepdim=True), own, embeds)

    def inputs_embeds(self, input_ids, visuals: VisualBatch | None = None, cached: bool = False):
        """What the decoder reads: the text's embeddings with the images fused in by the strategy."""
        images = list(visuals.images) if visuals else None
        tokens = self.image_tokens(images, list(visuals.features) if visuals.features else None) if images else None
        return self.fusion.inputs_embeds(self, input_ids, tokens, cached, images=images)

    # ---- forward --------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        visuals: VisualBatch | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        prefix_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        read: torch.Tensor | None = None,
    ) -> VLMOutput:
        """`visuals`: every image of the batch in token order (`processing.base.VisualBatch`),
        with cached tower features where there are some. `prefix_mask` ((B, T) bool, the prompt of each sample: `Batch.prompt_mask`) is read by
        the `prefix` attention rule; without it the whole uncached input is the prompt.
        `inputs_embeds`: the caller's embeddings of `input_ids`, used as they are, with no fusion
        step (generation embeds the tokens it produced as text, whatever their ids).
        `read` ((B, T) bool): the only positions whose hidden states the caller reads (a loss's
        supervised positions). `hidden_states` then holds those alone, as (N, C) rows in row-major
        order (the full output indexed by `read`), and a decoder that `model.lean_train` supports
        runs only the work they depend on."""
        cached = past_key_values is not None and (past_key_values.get_seq_length() if hasattr(past_key_values, "get_seq_length") else 1) > 0
        embeds = inputs_embeds
        if embeds is None:
            embeds = self.inputs_embeds(input_ids, visuals, cached=past_key_values is not None)
        if self.attention_rule.name != "causal" and not cached:
            attention_mask = decoder_mask(self.attention_rule, self.llm.config, input_ids, embeds, attention_mask,
                                          position_ids, self.image_token_id, prefix_mask)
        if read is not None:
            if labels is not None or use_cache or past_key_values is not None:
                raise ValueError("`read` selects the hidden states of an uncached forward without labels")
            try:
                return VLMOutput(self._read_rows(embeds, attention_mask, position_ids, read), head=lm_head(self.llm))
            finally:
                self.fusion.after_forward(False)
        try:
            out = run_decoder(self.llm.base_model, embeds, attention_mask, position_ids, past_key_values, use_cache)
        finally:
            self.fusion.after_forward(use_cache)
        head = lm_head(self.llm)
        cache = _output_cache(out) if use_cache else None
        result = VLMOutput(out.last_hidden_state, cache, head=head)
        if labels is not None:
            result.loss, result.num_supervised = next_token_loss(out.last_hidden_state, labels, head)
        return result


    def _read_rows(self, embeds, attention_mask, position_ids, read) -> torch.Tensor:
        decoder = self.llm.base_model
        if self.attention_rule.name == "causal" and bool(read.any()) and lean_decoder(decoder, attention_mask, position_ids):
            return supervised_hidden(decoder, embeds, attention_mask, position_ids, read)
        return run_decoder(decoder, embeds, attention_mask, position_ids).last_hidden_state[read]


def _output_cache(out):
    """The KV cache of a decoder's output. transformers 5 renamed the field `past_key_values` to
    `cache` and logs a deprecation warning when an output without the old field is read by the
    old name, so the name the output declares is read."""
    fields = getattr(out, "__dataclass_fields__", None)
    if fields is None:  # not a transformers output
        return getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    return getattr(out, "cache" if "cache" in fields or "past_key_values" not in fields else "past_key_values", None)


def _fixed_tokens(connector, grid, config: ModelConfig) -> int:
    """The fixed family's per-image slots: the connector's output for the base grid, or one
    marker under cross-attention."""
    if config.processor.name != "fixed":
        return 0
    connector.check_grid(grid)  # before counting its tokens over that grid
    return 1 if config.fusion == "cross-attention" else connector.num_tokens(grid)


@functools.lru_cache(maxsize=None)
def _cache_argument(decoder_cls: type) -> str:
    # transformers 5 renamed the decoder's `past_key_values` argument to `cache`.
    return "cache" if "cache" in inspect.signature(decoder_cls.forward).parameters else "past_key_values"


def run_decoder(decoder: nn.Module, embeds, attention_mask, position_ids, cache=None, use_cache: bool = False):
    """The LLM's decoder stack (no LM head) on input embeddings."""
    kwargs = {_cache_argument(type(decoder)): cache} if cache is not None else {}
    return decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache, **kwargs)


def ensure_image_token(tokenizer, image_token: str) -> int:
    """Add the image placeholder as a special token (once) and return its id.

    Its id may lie past the LM's embedding table: image-token ids are never looked up, their
    slots are overwritten with visual embeddings, so the LM needs no resized vocabulary.
    """
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(image_token)
