"""Llama 4's vision tower (`llama4-vit`): transformers' `Llama4VisionModel` whole, its own ViT
(unfold patch embedding, a class token at the end, 2D rotary attention) followed by its vision
adapter (a pixel shuffle by `pixel_shuffle_ratio` and a two-layer GELU MLP), as the reference runs
it. Each 336 px tile comes out as (336 / 14 * ratio)^2 tokens of `projector_output_dim`, row-major
(the adapter's shuffle order, which is what the LLM was trained on); the `linear` connector
(bias-free) is `multi_modal_projector`.

The text model is transformers' `Llama4ForCausalLM` (`llama4-text`, from the folder import writes;
`llama4-text-random` for recipes), with its decoder named as vlmkit reads it.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.config import LLMConfig, VisionConfig
from vlmkit.model.language import llm_folder
from vlmkit.model.vision import VisionTower
from vlmkit.paths import offline
from vlmkit.registry import LANGUAGE_MODELS, VISION_TOWERS
from vlmkit.tokenizer import byte_level_tokenizer

TOWER, LLM = "llama4-vit", "llama4-text"


class Llama4Tower(VisionTower):
    from_files = False  # built from a config; its weights travel with the checkpoint

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cfg = model.config
        self.hidden_size = cfg.projector_output_dim
        self.patch_size = cfg.patch_size
        self.stride = round(1 / cfg.pixel_shuffle_ratio)

    def grid_hw(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size // self.stride, width // self.patch_size // self.stride

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values.to(next(self.model.parameters()).dtype)).last_hidden_state


@VISION_TOWERS.register(TOWER)
def build_llama4_tower(cfg: VisionConfig, pretrained: bool = False) -> VisionTower:
    """A randomly initialised Llama 4 vision model from `cfg.config` (Llama4VisionConfig fields);
    `vlmkit import-hf` loads the weights into it."""
    from transformers import Llama4VisionConfig, Llama4VisionModel

    return Llama4Tower(Llama4VisionModel(Llama4VisionConfig(**(cfg.config or {}))))


def _causal_lm_class():
    """transformers' Llama4ForCausalLM names its base model `language_model` (the prefix it has
    inside the multimodal model), so its `base_model` is itself; vlmkit runs the decoder through
    `base_model`. This subclass names the decoder it holds (`model`); its tensors keep their names."""
    from transformers import Llama4ForCausalLM

    return type("Llama4TextCausalLM", (Llama4ForCausalLM,), {"base_model_prefix": "model"})


def llama4_causal_lm(config):
    return _causal_lm_class()(config)


@LANGUAGE_MODELS.register(LLM)
def build_llama4_llm(cfg: LLMConfig, pretrained: bool = True):
    """Llama 4's text model (mixture of experts, chunked attention) from a local folder: what
    `vlmkit import-hf` writes as a checkpoint's `llm/`."""
    from transformers import AutoConfig, AutoTokenizer

    offline()
    folder = llm_folder(cfg, LLM)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if pretrained:
        return _causal_lm_class().from_pretrained(folder, local_files_only=True, dtype=torch.float32), tokenizer
    return llama4_causal_lm(AutoConfig.from_pretrained(folder, local_files_only=True)), tokenizer


@LANGUAGE_MODELS.register(f"{LLM}-random")
def build_random_llama4_llm(cfg: LLMConfig, pretrained: bool = False):
    """A randomly initialised Llama 4 text model from `cfg.config` (Llama4TextConfig fields), with
    the offline byte-level tokenizer."""
    from transformers import Llama4TextConfig

    tokenizer = byte_level_tokenizer()
    kwargs = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
              "bos_token_id": tokenizer.bos_token_id, **(cfg.config or {})}
    return llama4_causal_lm(Llama4TextConfig(**kwargs)), tokenizer
