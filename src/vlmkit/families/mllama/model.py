"""Llama 3.2 Vision's own parts from transformers, as a vlmkit vision tower and LLM.

* `mllama-vit`: `MllamaVisionModel`. It encodes an image's tiles together (a global
  transformer runs across the tiles, with tile position embeddings chosen by the aspect-ratio id),
  so it reads whole images (`encodes_whole_images`): `encode_image` takes a `ProcessedImage` of
  the `mllama` processor with every tile slot as a view (`options.pad_tiles: true`), its
  aspect-ratio id and tile mask, and returns one feature block per view (class token + patches,
  plus the intermediate layers' features concatenated on the channel axis: `vision_output_dim` wide).
* `mllama-text`: `MllamaForCausalLM`, the Llama decoder with gated cross-attention layers at
  `cross_attention_layers`; vlmkit's cross-attention fusion drives those layers with
  `options.cross_attention.layers: llm` (`model/cross_attention.py`), by the rule this module
  declares (`OwnCrossAttentionLayers`): an image is read from its marker up to the next image's
  marker (a run of adjacent markers shares one range to the end; `image_ranges`), never its empty
  tile slots (past the image's `num_tiles`), and a token that sees no image reads the whole memory
  but skips the layer's FFN, as transformers computes it.

Both are built from a config (the tower) or a folder (the LLM); import-hf writes both.
"""

from __future__ import annotations

import functools

import torch

from vlmkit.config import LLMConfig, VisionConfig
from vlmkit.model.cross_attention import OwnCrossAttentionLayers
from vlmkit.model.language import llm_folder
from vlmkit.model.vision import VisionTower
from vlmkit.paths import offline
from vlmkit.registry import LANGUAGE_MODELS, VISION_TOWERS


class MllamaViTTower(VisionTower):
    # Tiles are not independent: the tower needs the whole image (all its tile slots) at once.
    encodes_whole_images = True
    from_files = False  # built from a config; its weights travel with the checkpoint

    def __init__(self, config: dict):
        super().__init__()
        from transformers import MllamaVisionConfig, MllamaVisionModel

        self.model = MllamaVisionModel(MllamaVisionConfig(**config)).eval()
        cfg = self.model.config
        self.hidden_size = cfg.vision_output_dim
        self.patch_size = cfg.patch_size
        self.tile_size = cfg.image_size
        self.max_tiles = cfg.max_num_tiles

    def grid_hw(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise ValueError("mllama-vit encodes whole images (all tile slots with their aspect-ratio id): "
                         "pair it with the mllama processor (options.pad_tiles: true)")

    def encode_image(self, image) -> list[torch.Tensor]:
        """(1, states, vision_output_dim) per view of one mllama-processed image."""
        ratio = image.extra.get("aspect_ratio_id")
        mask = image.extra.get("aspect_ratio_mask")
        pixels = image.pixel_values
        if ratio is None or mask is None or pixels.shape[0] != self.max_tiles or len(image.views) != self.max_tiles:
            raise ValueError(f"mllama-vit needs the mllama processor's {self.max_tiles} tile slots (options.pad_tiles: true, "
                             f"max_tiles: {self.max_tiles}) with their aspect-ratio id and mask; got {pixels.shape[0]} tiles "
                             f"and {len(image.views)} views")
        param = next(self.model.parameters())
        out = self.model(pixel_values=pixels[None, None].to(param.device, param.dtype),
                         aspect_ratio_ids=torch.tensor([[int(ratio)]], device=param.device),
                         aspect_ratio_mask=torch.as_tensor(mask, device=param.device)[None, None]).last_hidden_state
        return list(out[0, 0].unsqueeze(1))  # max_tiles x (1, states, C)


@VISION_TOWERS.register("mllama-vit")
def build_mllama_vit(cfg: VisionConfig, pretrained: bool = False) -> VisionTower:
    return MllamaViTTower(dict(cfg.config or {}))


def image_ranges(markers: list[int], length: int) -> list[tuple[int, int]]:
    """[start, end) of the tokens that read each image, as transformers' Llama 3.2 Vision
    processor sets them (`get_cross_attention_token_mask`): from the image's marker to the next
    marker (the last one: to the end); a marker directly followed by another shares that one's end."""
    if not markers:
        return []
    ranges = [[a, b] for a, b in zip(markers[:-1], markers[1:])] + [[markers[-1], length]]
    last = ranges[-1][1]
    for r in reversed(ranges):
        if r[0] == r[1] - 1:
            r[1] = last
        last = r[1]
    return [(a, b) for a, b in ranges]


def _readable(tokens: torch.Tensor, image) -> torch.Tensor:
    """Which of an image's memory rows a token that sees the image reads: all but the empty tile
    slots (views past the processor's `num_tiles`), which are encoded but never read."""
    n = tokens.shape[0]
    views = len(image.views) if image is not None else 0
    if not views or n % views:
        return torch.ones(n, dtype=torch.bool, device=tokens.device)
    real = torch.arange(views, device=tokens.device) < image.extra.get("num_tiles", views)
    return real.repeat_interleave(n // views)


class MllamaCrossAttentionRule(OwnCrossAttentionLayers):
    """Llama 3.2 Vision's memory, visibility and decoder inputs for its cross-attention layers."""

    def cross_attention_memory(self, tokens, images, input_ids, image_token_id):
        """(B, K*M, D) memory and (B, L, K*M) visibility: image j of a sample is read over its
        `image_ranges` range, except its empty tile slots."""
        b, length = input_ids.shape
        markers = [[j for j, t in enumerate(row) if t == image_token_id] for row in input_ids.tolist()]
        if sum(map(len, markers)) != len(tokens):
            raise ValueError(f"the text has {sum(map(len, markers))} image markers but {len(tokens)} images were given")
        m = max(t.shape[0] for t in tokens)
        k = max(max(map(len, markers)), 1)
        memory = tokens[0].new_zeros(b, k, m, tokens[0].shape[-1])
        mask = torch.zeros(b, length, k, m, dtype=torch.bool, device=tokens[0].device)
        at = 0
        for i in range(b):
            for j, (start, end) in enumerate(image_ranges(markers[i], length)):
                t = tokens[at]
                memory[i, j, : t.shape[0]] = t
                mask[i, start:end, j, : t.shape[0]] = _readable(t, images[at] if images is not None else None)
                at += 1
        return memory.reshape(b, k * m, -1), mask.reshape(b, length, k * m)

    def cross_attention_inputs(self, memory, visible, dtype):
        """transformers' masks from (B, L, N) visibility: the additive (B, 1, L, N) attention mask,
        zero on rows that see nothing, and the (B, 1, L, 1) row mask that zeroes those rows' FFN."""
        inverted = (~visible).to(dtype)
        additive = inverted.masked_fill(inverted.bool(), torch.finfo(dtype).min)
        rows = (additive != torch.finfo(dtype).min).any(dim=-1).to(dtype)[..., None]
        return {"cross_attention_states": memory, "cross_attention_mask": (additive * rows)[:, None],
                "full_text_row_masked_out_mask": rows[:, None]}


@functools.cache
def causal_lm_class():
    # transformers is heavy: its Mllama classes load only when the LLM is built
    from transformers import MllamaForCausalLM

    class MllamaTextCausalLM(MllamaCrossAttentionRule, MllamaForCausalLM):
        """`MllamaForCausalLM` whose `base_model` is its decoder (transformers names the prefix
        after the full model's `language_model`, so `base_model` would be the causal LM itself),
        with its cross-attention rule declared."""

        base_model_prefix = "model"

    return MllamaTextCausalLM


@LANGUAGE_MODELS.register("mllama-text")
def build_mllama_text(cfg: LLMConfig, pretrained: bool = True):
    """Llama 3.2 Vision's text decoder (self- and gated cross-attention layers) from a local folder
    holding `MllamaForCausalLM.save_pretrained` output and the tokenizer: what import-hf writes."""
    from transformers import AutoConfig, AutoTokenizer

    offline()
    folder = llm_folder(cfg, "mllama-text")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type != "mllama_text_model":
        raise ValueError(f"{folder}: model_type {config.model_type!r} is not Llama 3.2 Vision's text model (mllama_text_model)")
    cls = causal_lm_class()
    model = (cls.from_pretrained(folder, local_files_only=True, dtype=torch.float32) if pretrained else cls(config)).eval()
    return model, AutoTokenizer.from_pretrained(folder, local_files_only=True)
