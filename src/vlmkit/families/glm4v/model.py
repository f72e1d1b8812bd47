"""GLM-4.1V's own parts, taken from transformers so their maths is the reference's:

* `glm4v-vit`: its ViT (3D patch embedding, RMSNorm after it, a learned position table
  resampled bicubically to each image's patch grid, 2D rotary positions, SwiGLU blocks, a final
  RMSNorm). Features leave row-major per frame, one per patch.
* `glm4v-merger`: its 2x2 strided-convolution downsample (one token per merge window) and its
  PatchMerger (linear, LayerNorm, GELU, SwiGLU MLP).
* an LLM with partial rotary M-RoPE (`glm4v-text`): transformers' `Glm4vTextModel` plus an LM
  head, `position_rule = "mrope"`: the same (3, B, T) triples as Qwen2-VL's; the rotary
  embedding spans only part of each head and splits it into the time / height / width sections.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from vlmkit.config import LLMConfig, VisionConfig
from vlmkit.families.qwen2_vl.model import MRopeCausalLM, PatchViTTower, load_mrope_llm
from vlmkit.model.connectors.base import Connector, ConnectorOptions
from vlmkit.model.connectors.layers import check_tokens
from vlmkit.model.vision import VisionTower
from vlmkit.registry import CONNECTORS, LANGUAGE_MODELS, VISION_TOWERS
from vlmkit.tokenizer import byte_level_tokenizer


class Glm4vViTTower(PatchViTTower):
    tower_name, processor_name = "glm4v-vit", "glm4v"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.hidden_size = model.config.hidden_size

    def encode_patches(self, patches: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
        """(t, h*w, C) after the final RMSNorm, row-major per frame: transformers' forward up to
        its downsample (the connector's), with its own helpers."""
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

        t, h, w = grid_thw
        m, vit = self.merge_size, self.model
        # A video is read as t single frames, as transformers' get_video_features hands it over.
        grid = torch.tensor([[1, h, w]] * t, device=patches.device)
        positions = get_vision_position_ids(grid, m, kwargs={})
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid, vit.config, kwargs={})
        x = vit.post_conv_layernorm(vit.patch_embed(patches.to(vit.patch_embed.proj.weight.dtype)))
        rotary = vit.rotary_pos_emb(x, positions)
        x = vit.embeddings(x, cu_seqlens[1:] - cu_seqlens[:-1], grid, positions[:, 0].to(x.device), positions[:, 1].to(x.device))
        for block in vit.blocks:
            x = block(x, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_embeddings=rotary)
        return self.row_major(vit.post_layernorm(x), grid_thw)  # from merge-window order


@VISION_TOWERS.register("glm4v-vit")
def build_glm4v_vit(cfg: VisionConfig, pretrained: bool = False) -> VisionTower:
    """A randomly initialised GLM-4.1V ViT from `cfg.config` (Glm4vVisionConfig fields), without
    its downsample and merger (the connector's); `vlmkit import-hf` loads the weights into it."""
    from transformers import Glm4vVisionConfig
    from transformers.models.glm4v.modeling_glm4v import Glm4vVisionModel

    model = Glm4vVisionModel._from_config(Glm4vVisionConfig(**(cfg.config or {})))
    del model.downsample, model.merger
    return Glm4vViTTower(model)


class Glm4vMergerOptions(ConnectorOptions):
    hidden_size: int = 13696  # the SwiGLU MLP's width (the vision config's intermediate_size)
    act: str = "silu"  # the vision config's hidden_act
    merge: int = 2  # the downsample's window and stride


@CONNECTORS.register("glm4v-merger")
class Glm4vMerger(Connector):
    """GLM-4.1V's downsample and PatchMerger: a merge x merge strided convolution folds each
    window of patch features into one token of the LLM width, then linear, LayerNorm, GELU and a
    SwiGLU MLP."""

    Options = Glm4vMergerOptions

    def __init__(self, vision_dim: int, llm_dim: int, options: Glm4vMergerOptions):
        super().__init__(vision_dim, llm_dim, options)
        from transformers.activations import ACT2FN

        m = self.merge = options.merge
        self.downsample = nn.Conv2d(vision_dim, llm_dim, kernel_size=m, stride=m)
        self.proj = nn.Linear(llm_dim, llm_dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(llm_dim)
        self.gate_proj = nn.Linear(llm_dim, options.hidden_size, bias=False)
        self.up_proj = nn.Linear(llm_dim, options.hidden_size, bias=False)
        self.down_proj = nn.Linear(options.hidden_size, llm_dim, bias=False)
        self.act_fn = ACT2FN[options.act]

    def check_grid(self, grid: tuple[int, int]) -> None:
        if grid[0] % self.merge or grid[1] % self.merge or min(grid) < 1:
            raise ValueError(f"glm4v-merger: a {grid[0]}x{grid[1]} feature grid does not split into {self.merge}x{self.merge} windows")

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return grid[0] // self.merge, grid[1] // self.merge

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return (grid[0] // self.merge) * (grid[1] // self.merge)

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        self.check_grid(grid)
        check_tokens(features, grid, "glm4v-merger")
        b, (h, w), m = features.shape[0], grid, self.merge
        # One merge window per convolution input, laid out in memory as transformers lays it out
        # (window, row, column, channel), so the convolution does the same arithmetic.
        windows = features.reshape(b, h // m, m, w // m, m, -1).permute(0, 1, 3, 2, 4, 5).reshape(-1, m, m, features.shape[-1])
        x = self.downsample(windows.permute(0, 3, 1, 2)).view(b, (h // m) * (w // m), -1)
        x = nn.functional.gelu(self.post_projection_norm(self.proj(x)))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Glm4vCausalLM(MRopeCausalLM):
    """GLM-4.1V's text decoder (partial rotary M-RoPE, sandwich norms; GLM-4.5V: routed and shared
    experts) with an LM head."""

    # GLM-4.1V's text model, and GLM-4.5V's mixture-of-experts one.
    TEXT_MODELS: ClassVar[dict[str, str]] = {
        "glm4v_text": "transformers.models.glm4v.modeling_glm4v:Glm4vTextModel",
        "glm4v_moe_text": "transformers.models.glm4v_moe.modeling_glm4v_moe:Glm4vMoeTextModel",
    }
    UNKNOWN_TYPE = "model_type {!r} is not a GLM-4V text model {}"


@LANGUAGE_MODELS.register("glm4v-text-random")
def build_random_glm4v_llm(cfg: LLMConfig, pretrained: bool = False):
    """A randomly initialised GLM-4.1V text decoder from `cfg.config`, with the offline byte-level tokenizer."""
    from transformers import Glm4vTextConfig

    tokenizer = byte_level_tokenizer()
    kwargs = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id, **(cfg.config or {})}
    head_dim = kwargs.get("hidden_size", 4096) // kwargs.get("num_attention_heads", 32)
    # Half of each head rotates; GLM-4.1V splits its 32 rotary pairs 8 / 12 / 12 (scaled to the head here).
    half = head_dim // 4
    hw = (half * 12) // 32
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": [half - 2 * hw, hw, hw]}
    rope.update(kwargs.pop("rope_parameters", {}))
    return Glm4vCausalLM(Glm4vTextConfig(rope_parameters=rope, **kwargs)), tokenizer


@LANGUAGE_MODELS.register("glm4v-text")
def build_pretrained_glm4v_llm(cfg: LLMConfig, pretrained: bool = True):
    """A GLM-4.1V text decoder from a local folder holding its text config, `model.safetensors` and
    the tokenizer: what `vlmkit import-hf` writes as a checkpoint's `llm/`."""
    return load_mrope_llm(cfg, "glm4v-text", Glm4vCausalLM, "a GLM-4V text model", pretrained)
