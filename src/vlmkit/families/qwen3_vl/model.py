"""Qwen3-VL's own parts, taken from transformers so their maths is the reference's:

* `qwen3-vit`: the native-resolution ViT (3D patch embedding, a learned position grid resampled
  to each image, 2D rotary positions). Its mergers are left out: the tower returns its last
  layer's features and those of its DeepStack layers side by side on the channel axis, each in
  row-major order per frame.
* `qwen3-vl-merger`: the PatchMerger (LayerNorm per patch, 2x2 merge, MLP) for the last layer
  and one post-merge-norm PatchMerger per DeepStack level; it declares `feature_levels`, so
  prefix fusion adds the levels after the first decoder layers (`model/deepstack.py`).
* an LLM with interleaved M-RoPE (`qwen3-vl-text`): transformers' `Qwen3VLTextModel` plus an LM
  head, `position_rule = "mrope"`. Its positions are Qwen2-VL's (3, B, T) triples; the
  interleaving of the time, height and width frequencies happens inside its rotary embedding.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from vlmkit.config import LLMConfig, VisionConfig
from vlmkit.families.qwen2_vl.model import MRopeCausalLM, PatchViTTower, load_mrope_llm, save_mrope_llm
from vlmkit.model.connectors.base import Connector
from vlmkit.model.connectors.pixel_shuffle import PixelShuffleConnector, PixelShuffleOptions, ShuffleOptions
from vlmkit.model.vision import VisionTower
from vlmkit.registry import CONNECTORS, LANGUAGE_MODELS, VISION_TOWERS
from vlmkit.tokenizer import byte_level_tokenizer

__all__ = ["Qwen3VLCausalLM", "Qwen3VLMerger", "Qwen3ViTTower", "save_mrope_llm"]


class Qwen3ViTTower(PatchViTTower):
    tower_name, processor_name = "qwen3-vit", "qwen3vl"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        cfg = model.config
        self.levels = len(cfg.deepstack_visual_indexes)
        self.width = cfg.hidden_size
        # The last layer's features and each DeepStack layer's, side by side.
        self.hidden_size = cfg.hidden_size * (1 + self.levels)

    def encode_patches(self, patches: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
        dtype = self.model.patch_embed.proj.weight.dtype
        out = self.model(hidden_states=patches.to(dtype), grid_thw=torch.tensor([grid_thw], device=patches.device))
        return self.row_major(torch.cat([out.last_hidden_state, *out.deepstack_features], dim=-1), grid_thw)


@VISION_TOWERS.register("qwen3-vit")
def build_qwen3_vit(cfg: VisionConfig, pretrained: bool = False) -> VisionTower:
    """A randomly initialised Qwen3-VL ViT from `cfg.config` (Qwen3VLVisionConfig fields);
    `vlmkit import-hf` loads the weights into it."""
    from transformers import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    model = Qwen3VLVisionModel._from_config(Qwen3VLVisionConfig(**(cfg.config or {})))
    # The mergers are the connector's: the tower hands out the raw features of every level.
    model.merger = nn.Identity()
    model.deepstack_merger_list = nn.ModuleList(nn.Identity() for _ in model.deepstack_merger_list)
    return Qwen3ViTTower(model)


class Qwen3VLMergerOptions(ShuffleOptions):
    levels: int = Field(default=3, ge=0)  # DeepStack levels after the last layer's features
    hidden_size: int | None = None  # the MLP's width; Qwen3-VL keeps the merged width (4 x tower width)
    norm_eps: float = 1e-6


@CONNECTORS.register("qwen3-vl-merger")
class Qwen3VLMerger(Connector):
    """Qwen3-VL's PatchMerger over the last layer (LayerNorm per patch before the merge) and one
    PatchMerger per DeepStack level (LayerNorm over the merged channels). Reads features of width
    (1 + levels) x tower width; each token leaves as (1 + levels) blocks of the LLM width."""

    Options = Qwen3VLMergerOptions

    def __init__(self, vision_dim: int, llm_dim: int, options: Qwen3VLMergerOptions):
        super().__init__(vision_dim, llm_dim, options)
        levels = options.levels
        if vision_dim % (1 + levels):
            raise ValueError(f"qwen3-vl-merger: tower width {vision_dim} is not {1 + levels} levels of equal width")
        self.feature_levels = levels
        width = vision_dim // (1 + levels)
        self.width = width

        def merger(norm: str) -> PixelShuffleConnector:
            opts = PixelShuffleOptions(ratio=options.ratio, norm=norm, norm_eps=options.norm_eps, hidden_size=options.hidden_size)
            return PixelShuffleConnector(width, llm_dim, opts)

        self.main = merger("pre")
        self.levels = nn.ModuleList(merger("post") for _ in range(levels))
        self.factor = self.main.factor

    def check_grid(self, grid: tuple[int, int]) -> None:
        self.main.check_grid(grid)

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return self.main.output_grid(grid)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return self.main.num_tokens(grid)

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        parts = features.split(self.width, dim=-1)
        return torch.cat([self.main(parts[0], grid), *(m(f, grid) for m, f in zip(self.levels, parts[1:]))], dim=-1)


class Qwen3VLCausalLM(MRopeCausalLM):
    """Qwen3-VL's text decoder (q/k norms, interleaved M-RoPE; dense or mixture-of-experts) with an LM head."""

    # Qwen3-VL's text models: dense, and mixture-of-experts (Qwen3-VL-30B-A3B, 235B-A22B).
    TEXT_MODELS: ClassVar[dict[str, str]] = {
        "qwen3_vl_text": "transformers.models.qwen3_vl.modeling_qwen3_vl:Qwen3VLTextModel",
        "qwen3_vl_moe_text": "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe:Qwen3VLMoeTextModel",
    }
    UNKNOWN_TYPE = "model_type {!r} is not a Qwen3-VL text model {}"


def build_qwen3_vl_llm(cfg: LLMConfig, tokenizer) -> Qwen3VLCausalLM:
    from transformers import Qwen3VLTextConfig

    kwargs = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id, **(cfg.config or {})}
    head_dim = kwargs.setdefault("head_dim", kwargs.get("hidden_size", 4096) // kwargs.get("num_attention_heads", 32))
    # Interleaved M-RoPE: Qwen3-VL's sections are 24, 20, 20 of 64 rotary pairs; scaled to the head here.
    half = head_dim // 2
    hw = (half * 20) // 64
    rope = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta", 5_000_000.0),
            "mrope_section": [half - 2 * hw, hw, hw], "mrope_interleaved": True}
    rope.update(kwargs.pop("rope_parameters", {}))
    return Qwen3VLCausalLM(Qwen3VLTextConfig(rope_parameters=rope, **kwargs))


@LANGUAGE_MODELS.register("qwen3-vl-text-random")
def build_random_qwen3_vl_llm(cfg: LLMConfig, pretrained: bool = False):
    """A randomly initialised Qwen3-VL text decoder from `cfg.config`, with the offline byte-level tokenizer."""
    tokenizer = byte_level_tokenizer()
    return build_qwen3_vl_llm(cfg, tokenizer), tokenizer


@LANGUAGE_MODELS.register("qwen3-vl-text")
def build_pretrained_qwen3_vl_llm(cfg: LLMConfig, pretrained: bool = True):
    """A Qwen3-VL text decoder from a local folder holding its text config, `model.safetensors`
    and the tokenizer: what `vlmkit import-hf` writes as a checkpoint's `llm/`."""
    return load_mrope_llm(cfg, "qwen3-vl-text", Qwen3VLCausalLM, "a Qwen3-VL text model", pretrained)
