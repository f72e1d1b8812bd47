"""Assembly: vision tower -> connector -> language model, with prefix fusion.

Prefix fusion: the prompt holds one image token per visual slot; their embeddings are replaced
by the connector's outputs, in order. The processor promised how many slots each image takes;
the model checks the promise and refuses a mismatch instead of truncating image tokens.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import ModelConfig
from vlmkit.model.connectors import build_connector
from vlmkit.model.language import build_language_model
from vlmkit.model.vision import build_vision_tower

IGNORE_INDEX = -100
PARTS = ("vision", "connector", "llm", "cross_attention")


@dataclass
class VLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None
    num_supervised: int = 0
    past_key_values: object | None = None


class VisionLanguageModel(nn.Module):
    def __init__(self, config: ModelConfig, vision: nn.Module, connector: nn.Module, llm: nn.Module, tokenizer, pretrained_parts: set[str]):
        super().__init__()
        self.config = config
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.tokenizer = tokenizer
        # Parts whose weights come from files the config names: a checkpoint need not repeat them.
        self.pretrained_parts = set(pretrained_parts)
        self.frozen: set[str] = set()
        self.image_token_id = ensure_image_token(tokenizer, config.image_token)
        self.vocab_size = llm.get_input_embeddings().num_embeddings
        if self.image_token_id < self.vocab_size:
            # The placeholder must never collide with a real token the LM could emit.
            existing = tokenizer.convert_ids_to_tokens(self.image_token_id)
            if existing != config.image_token:
                raise ValueError(f"image token {config.image_token!r} collides with vocabulary entry {existing!r}")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, config: ModelConfig, pretrained: bool = True) -> "VisionLanguageModel":
        if config.fusion == "cross-attention" and cls is VisionLanguageModel:
            from vlmkit.model.cross_attention import CrossAttentionVLM

            return CrossAttentionVLM.build(config, pretrained=pretrained)
        vision = build_vision_tower(config.vision, pretrained=pretrained)
        llm, tokenizer = build_language_model(config.llm, pretrained=pretrained)
        grid = vision.grid(config.processor.image_size)
        llm_dim = llm.get_input_embeddings().embedding_dim
        connector = build_connector(config.connector.name, vision.hidden_size, llm_dim, config.connector.options, grid=grid)
        pretrained_parts = set()
        if pretrained and not config.vision.name.endswith("random"):
            pretrained_parts.add("vision")
        if pretrained and not config.llm.name.endswith("random"):
            pretrained_parts.add("llm")
        return cls(config, vision, connector, llm, tokenizer, pretrained_parts)

    def parts(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "connector": self.connector, "llm": self.llm}

    @property
    def image_grid(self) -> tuple[int, int]:
        return self.vision.grid(self.config.processor.image_size)

    @property
    def tokens_per_image(self) -> int:
        return self.connector.num_tokens(self.image_grid)

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    # ---- freezing -----------------------------------------------------------------------
    def set_trainable(self, trainable: list[str] | set[str]) -> None:
        """Train exactly the named parts; frozen parts stay in eval mode (BatchNorm, dropout)."""
        parts = self.parts()
        unknown = set(trainable) - set(parts)
        if unknown:
            raise ValueError(f"this model has no parts {sorted(unknown)}; it has {sorted(parts)}")
        self.frozen = set(parts) - set(trainable)
        for name, module in parts.items():
            module.requires_grad_(name not in self.frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "VisionLanguageModel":
        super().train(mode)
        for name in self.frozen:
            self.parts()[name].eval()
        return self

    def trainable_parameters(self) -> dict[str, int]:
        return {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in self.parts().items()}

    # ---- forward ------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) -> (images, grid tokens, vision width)."""
        return self.vision(pixel_values.to(self.device, dtype=next(self.vision.parameters()).dtype))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.connector(features, self.image_grid)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image-token slots filled by `image_embeds`, in order."""
        is_image = input_ids == self.image_token_id
        safe_ids = input_ids.masked_fill(is_image, 0)
        embeds = self.llm.get_input_embeddings()(safe_ids)
        slots = int(is_image.sum())
        given = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if slots != given:
            raise ValueError(
                f"the prompt has {slots} image-token slots but the images produced {given} visual tokens; "
                "the processor and the model disagree (was an image truncated?)"
            )
        if slots:
            flat = image_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), flat)
        return embeds

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
    ) -> VLMOutput:
        if image_features is None and pixel_values is not None and pixel_values.numel():
            image_features = self.vision_features(pixel_values)
        image_embeds = self.project(image_features.to(self.device)) if image_features is not None else None
        embeds = self.embed(input_ids, image_embeds)
        out = run_decoder(self.llm.base_model, embeds, attention_mask, position_ids, past_key_values, use_cache)
        hidden = out.last_hidden_state
        head = self.llm.get_output_embeddings()
        if labels is None:
            return VLMOutput(loss=None, logits=head(hidden), past_key_values=out.past_key_values if use_cache else None)
        loss, count = supervised_loss(hidden, labels, head)
        return VLMOutput(loss=loss, logits=None, num_supervised=count)


@functools.lru_cache(maxsize=None)
def _cache_argument(decoder_cls: type) -> str:
    # transformers 5 renamed the decoder's `past_key_values` argument to `cache`.
    return "cache" if "cache" in inspect.signature(decoder_cls.forward).parameters else "past_key_values"


def run_decoder(decoder: nn.Module, embeds, attention_mask, position_ids, cache=None, use_cache: bool = False):
    """The LLM's decoder stack (no LM head) on input embeddings."""
    kwargs = {_cache_argument(type(decoder)): cache} if cache is not None else {}
    return decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache, **kwargs)


def supervised_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk: int = 1024) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over supervised positions only.

    The LM head runs on the supervised rows alone, in chunks: most positions of a VLM sample are
    image and prompt tokens, and a full (tokens x vocab) logit tensor is the largest activation.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows = hidden[:, :-1][keep]
    wanted = targets[keep]
    count = int(wanted.numel())
    if count == 0:
        return hidden.sum() * 0.0, 0
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk):
        logits = head(rows[start : start + chunk]).float()
        total = total + F.cross_entropy(logits, wanted[start : start + chunk], reduction="sum")
    return total / count, count


def ensure_image_token(tokenizer, image_token: str) -> int:
    """Add the image placeholder as a special token (once) and return its id.

    Its id may lie past the LM's embedding table: image-token ids are never looked up, their
    slots are overwritten with visual embeddings, so the LM needs no resized vocabulary.
    """
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(image_token)
