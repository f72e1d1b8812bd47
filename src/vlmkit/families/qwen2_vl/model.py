"""Qwen2-VL's own parts, taken from transformers so their maths is the reference's:

* `qwen2-vit`: the native-resolution ViT (3D patch embedding, 2D rotary positions, attention
  bounded per image). It reads the processor's pre-flattened patches with their (t, h, w) grid.
  Its PatchMerger is left out: that is vlmkit's pixel-shuffle connector with `norm: pre`, so the
  connector stays a swappable part. Features leave the tower in row-major order per frame; the
  reference keeps them in 2x2 merge-window order, and pixel shuffle over a row-major grid puts
  the same four patches into each merged token in the same channel order.
* an LLM whose rotary positions are 3D (M-RoPE): transformers' `Qwen2VLTextModel` plus an LM
  head (`model.language.DecoderLM`), declaring `position_rule = "mrope"`: it takes
  `position_ids` of shape (3, B, T) from the chat processor (`processing/mrope.py`).
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import LLMConfig, VisionConfig
from vlmkit.model.language import DecoderLM, llm_folder
from vlmkit.model.vision import VisionTower
from vlmkit.paths import offline
from vlmkit.registry import LANGUAGE_MODELS, VISION_TOWERS
from vlmkit.tokenizer import byte_level_tokenizer

# Model types whose LLM takes (3, B, T) M-RoPE positions.


class PatchViTTower(VisionTower):
    """A ViT that reads the processor's pre-flattened patches with their (t, h, w) grid and
    returns its features in merge-window order (Qwen2-VL's, Qwen3-VL's, GLM-4V's towers); each
    family's tower sets its width and encodes the patches."""

    reads_patches = True
    # Built from a config with random weights: checkpoints must always carry it (see vlm.build).
    from_files = False
    # The registered tower and processor names, for the error on an image tensor.
    tower_name, processor_name = "qwen2-vit", "qwen2vl"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.patch_size = model.config.patch_size
        self.merge_size = model.config.spatial_merge_size

    def grid_hw(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        return height // p, width // p

    def row_major(self, feats: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
        """(t, h*w, C) features, row-major per frame, from the tower's (t*h*w, C) in merge-window order."""
        t, h, w = grid_thw
        m = self.merge_size
        c = feats.shape[-1]
        return feats.view(t, h // m, w // m, m, m, c).permute(0, 1, 3, 2, 4, 5).reshape(t, h * w, c)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"the {self.tower_name} tower reads pre-flattened patches (the {self.processor_name} processor), "
                         "not image tensors")


class Qwen2ViTTower(PatchViTTower):
    def __init__(self, model: nn.Module):
        super().__init__(model)
        cfg = model.config
        # Qwen2-VL's tower width is embed_dim (its hidden_size is the merger's output); Qwen2.5-VL's is hidden_size.
        self.hidden_size = cfg.embed_dim if cfg.model_type == "qwen2_vl_vision" else cfg.hidden_size
        self.temporal_patch_size = cfg.temporal_patch_size

    def encode_patches(self, patches: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
        return self.encode_patch_views([(patches, grid_thw)])[0]

    def encode_patch_views(self, views: list[tuple[torch.Tensor, tuple[int, int, int]]]) -> list[torch.Tensor]:
        """All views in one call of the tower, which attends within each view alone (its
        cumulative sequence lengths), as transformers runs a batch's images."""
        dtype = self.model.patch_embed.proj.weight.dtype
        patches = torch.cat([p for p, _ in views]).to(dtype)
        grids = torch.tensor([g for _, g in views], device=patches.device)
        out = self.model(hidden_states=patches, grid_thw=grids).last_hidden_state
        sizes = [t * h * w for _, (t, h, w) in views]
        return [self.row_major(f, g) for f, (_, g) in zip(out.split(sizes), views)]


class LinearPatchEmbed(nn.Module):
    """Qwen2-VL's (and Qwen2.5-VL's) patch embedding as the matmul it is: a Conv3d whose kernel
    equals its stride, over patches the processor has already cut and flattened in the kernel's
    (channel, time, row, column) order. It keeps the convolution as `proj`, so the weights keep
    their transformers names and shape; oneDNN's Conv3d takes about three times as long on a CPU."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.proj = embed.proj
        self.embed_dim = embed.embed_dim

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        flat = hidden_states.reshape(-1, w[0].numel()).to(w.dtype)
        return F.linear(flat, w.reshape(w.shape[0], -1), self.proj.bias)


@VISION_TOWERS.register("qwen2-vit")
def build_qwen2_vit(cfg: VisionConfig, pretrained: bool = False) -> VisionTower:
    """A randomly initialised Qwen2-VL ViT from `cfg.config` (Qwen2VLVisionConfig fields)."""
    from transformers import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    model = Qwen2VisionTransformerPretrainedModel._from_config(Qwen2VLVisionConfig(**(cfg.config or {})))
    model.merger = nn.Identity()  # the connector's job (see the module notes)
    model.patch_embed = LinearPatchEmbed(model.patch_embed)
    return Qwen2ViTTower(model)


class Qwen25ViTTower(Qwen2ViTTower):
    """Qwen2.5-VL's ViT (RMSNorm, SwiGLU, windowed attention with a few full-attention blocks).
    It runs its blocks over merge units regrouped by window and undoes that order only after
    its merger; with the merger left out (the connector's job), the tower's output is put back
    into merge-window order here, unit by unit, and then into row-major order like Qwen2-VL's."""

    def encode_patches(self, patches: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        m = self.merge_size
        cfg = self.model.config
        grid = torch.tensor([grid_thw], device=patches.device)
        dtype = self.model.patch_embed.proj.weight.dtype
        feats = self.model(hidden_states=patches.to(dtype), grid_thw=grid).last_hidden_state  # window order
        window_index, _ = get_vision_window_index(grid, spatial_merge_size=m, window_size=cfg.window_size, patch_size=cfg.patch_size)
        c = feats.shape[-1]
        feats = feats.view(-1, m * m, c)[torch.argsort(window_index.to(feats.device))].reshape(-1, c)
        return self.row_major(feats, grid_thw)

    def encode_patch_views(self, views: list[tuple[torch.Tensor, tuple[int, int, int]]]) -> list[torch.Tensor]:
        # The window order is undone per view.
        return [self.encode_patches(patches, grid) for patches, grid in views]


@VISION_TOWERS.register("qwen2.5-vit")
def build_qwen25_vit(cfg: VisionConfig, pretrained: bool = False) -> VisionTower:
    """A randomly initialised Qwen2.5-VL ViT from `cfg.config` (Qwen2_5_VLVisionConfig fields);
    `vlmkit import-hf` loads the weights into it."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    vision_cfg = Qwen2_5_VLConfig(vision_config=cfg.config or {}).vision_config
    model = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision_cfg)
    model.merger = nn.Identity()  # the connector's job: pixel-shuffle with an RMSNorm before the merge
    model.patch_embed = LinearPatchEmbed(model.patch_embed)
    return Qwen25ViTTower(model)


class MRopeCausalLM(DecoderLM):
    """Qwen2-VL's (or Qwen2.5-VL's) text decoder with an LM head; its positions are M-RoPE's.
    Other M-RoPE families' decoders are subclasses naming their own text models."""

    position_rule = "mrope"
    # model_type -> transformers' text model ("module:Class"), imported when one is built
    TEXT_MODELS: ClassVar[dict[str, str]] = {
        "qwen2_vl_text": "transformers.models.qwen2_vl.modeling_qwen2_vl:Qwen2VLTextModel",
        "qwen2_5_vl_text": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLTextModel",
    }
    UNKNOWN_TYPE = "no M-RoPE text model for model_type {!r}; expected one of {}"

    def __init__(self, config):
        super().__init__(config, self.text_model_class(config.model_type)._from_config(config))

    @classmethod
    def text_model_class(cls, model_type: str) -> type:
        if model_type not in cls.TEXT_MODELS:
            raise ValueError(cls.UNKNOWN_TYPE.format(model_type, list(cls.TEXT_MODELS)))
        module, name = cls.TEXT_MODELS[model_type].split(":")
        return getattr(importlib.import_module(module), name)


def build_mrope_llm(cfg: LLMConfig, tokenizer) -> MRopeCausalLM:
    from transformers import Qwen2VLTextConfig

    kwargs = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id, **(cfg.config or {})}
    heads = kwargs.get("num_attention_heads", 28)
    head_dim = kwargs.get("hidden_size", 3584) // heads
    # M-RoPE splits the rotary pairs between time, height and width; Qwen2-VL's is 1/4, 3/8, 3/8.
    half = head_dim // 2
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    rope = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta", 1_000_000.0), "mrope_section": section}
    rope.update(kwargs.pop("rope_parameters", {}))
    return MRopeCausalLM(Qwen2VLTextConfig(rope_parameters=rope, **kwargs))


@LANGUAGE_MODELS.register("qwen2-vl-text-random")
def build_random_mrope_llm(cfg: LLMConfig, pretrained: bool = False):
    """A randomly initialised Qwen2-VL text decoder (M-RoPE) from `cfg.config`, with the offline
    byte-level tokenizer."""
    tokenizer = byte_level_tokenizer()
    return build_mrope_llm(cfg, tokenizer), tokenizer


LLM_WEIGHTS = "model.safetensors"


def save_mrope_llm(model: MRopeCausalLM, tokenizer, folder) -> None:
    """Write the decoder as a folder `qwen2-vl-text` loads: its text config, safetensors weights
    (`model.*`, `lm_head.weight`; a tied head is stored once) and the tokenizer."""
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight")
    save_file(state, str(folder / LLM_WEIGHTS), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


@LANGUAGE_MODELS.register("qwen2-vl-text")
def build_pretrained_mrope_llm(cfg: LLMConfig, pretrained: bool = True):
    """A Qwen2-VL / Qwen2.5-VL text decoder (M-RoPE) from a local folder holding its text config,
    `model.safetensors` and the tokenizer: what `vlmkit import-hf` writes as a checkpoint's `llm/`."""
    return load_mrope_llm(cfg, "qwen2-vl-text", MRopeCausalLM, "an M-RoPE text model", pretrained)


def load_mrope_llm(cfg: LLMConfig, name: str, llm_cls: type[MRopeCausalLM], what: str, pretrained: bool):
    """An M-RoPE decoder (`llm_cls`) and its tokenizer from the local folder of the LLM `name`,
    which holds its text config, `model.safetensors` and the tokenizer; the weights are loaded
    when `pretrained`. A config whose model_type `llm_cls` does not build is `what` it is not."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    offline()
    folder = llm_folder(cfg, name)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type not in llm_cls.TEXT_MODELS:
        raise ValueError(f"{folder}: model_type {config.model_type!r} is not {what} {list(llm_cls.TEXT_MODELS)}")
    model = llm_cls(config)
    if pretrained:
        weights = folder / LLM_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing")
        load_state_checked(model, load_file(str(weights)), str(weights))
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


def load_state_checked(module: nn.Module, state: dict, source: str, optional=("rotary", "inv_freq", "lm_head.weight")) -> None:
    """Copy `state` into `module`, naming the first tensor that is missing, extra or mis-shaped."""
    target = module.state_dict()
    tied = getattr(getattr(module, "config", None), "tie_word_embeddings", False)
    missing = [k for k in target if k not in state and not any(o in k for o in optional)]
    if "lm_head.weight" in target and "lm_head.weight" not in state and not tied:
        missing.append("lm_head.weight")
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for key, value in state.items():
        if tuple(target[key].shape) != tuple(value.shape):
            raise ValueError(f"{source}: tensor {key} has shape {tuple(value.shape)}, the config expects {tuple(target[key].shape)}")
    module.load_state_dict(state, strict=False)
