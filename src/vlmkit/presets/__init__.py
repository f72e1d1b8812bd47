"""Named architectures at real shape (meta device, never allocated), their image processors, and
tiny CPU variants: the one preset registry that `vlmkit inspect` and `vlmkit tokens` share.

The data lives in `catalog.py`; this module turns an entry into modules. Real shapes use the
transformers config/model classes of each release for the vision tower and LLM, and vlmkit's
own connectors and cross-attention blocks, all under `torch.device("meta")`: parameter counts
and FLOP estimates come from real module trees without allocating a byte of weights. A preset's
image processor is built from its `ProcessorConfig` through IMAGE_PROCESSORS; where the count
per image is the connector's, it is the connector's `num_tokens`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmkit.config import ModelConfig, ProcessorConfig, VisionConfig
from vlmkit.model.connectors import build_connector
from vlmkit.model.cross_attention import CrossAttentionFusion, parse_cross_attention_options
from vlmkit.model.language import decoder_layers
from vlmkit.registry import IMAGE_PROCESSORS, PRESETS, VISION_TOWERS, load_plugins

PART_ORDER = ("vision", "connector", "cross_attention", "llm")


@dataclass(frozen=True)
class Preset:
    name: str
    data: dict[str, Any]

    @property
    def fusion(self) -> str:
        return self.data.get("fusion", "prefix")

    @property
    def published_total(self) -> float | None:
        return self.data["published"]["total"]

    @property
    def stages(self) -> dict[str, list[str]]:
        return self.data["stages"]

    @property
    def feature_grid(self) -> tuple[int, int]:
        """The vision tower's feature grid for one view at the base resolution."""
        rows, cols = self.data["image"]["grid"]
        return rows, cols

    def tiny_config(self) -> ModelConfig:
        return ModelConfig.model_validate(self.data["tiny"])

    def processor_config(self) -> ProcessorConfig:
        return ProcessorConfig.model_validate(self.data["processor"])


# Other names for a preset (the release names people type) -> its name, and the lecture's
# per-part figures of a preset ({part: (name, params)}), both filled by `register_presets`.
ALIASES: dict[str, str] = {}
LECTURE_FIGURES: dict[str, dict[str, tuple[str, float]]] = {}


def aliases() -> dict[str, str]:
    """Every preset alias -> its preset (after the families have registered theirs)."""
    load_plugins()
    return dict(ALIASES)


def register_presets(entries) -> None:
    """Register preset entries (a family's, from its folder): each under its name, its
    `aliases` (the release names people type) pointing at it, and its `lecture_figures` (the
    lecture's per-part figures, {part: (name, params)}) kept for `vlmkit inspect`."""
    for entry in entries:
        PRESETS.register(entry["name"])(lambda entry=entry: Preset(entry["name"], entry))
        for alias in entry.get("aliases", ()):
            if alias in ALIASES:
                raise ValueError(f"preset alias {alias!r} is registered twice")
            ALIASES[alias] = entry["name"]
        if "lecture_figures" in entry:
            LECTURE_FIGURES[entry["name"]] = entry["lecture_figures"]



def names() -> list[str]:
    """Canonical preset names, family by family, each family's in its own order (aliases are
    accepted but not listed)."""
    return PRESETS.in_order()


def resolve(name: str) -> str:
    """The canonical name for a preset name or alias; KeyError (listing the names) if unknown."""
    load_plugins()  # the family folders register their presets, and their aliases, on discovery
    name = ALIASES.get(name, name)
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(names())}")
    return name


def get_preset(name: str) -> Preset:
    return PRESETS.build(resolve(name))


def _resolve(name: str):
    if ":" in name:
        module, attr = name.split(":")
        return getattr(importlib.import_module(module), attr)
    import transformers

    return getattr(transformers, name)


# ---- real shape on the meta device -------------------------------------------------------------

@dataclass
class MetaModel:
    preset: Preset
    parts: dict[str, nn.Module]
    vision_dim: int
    llm_dim: int
    extra_params: dict[str, int] = field(default_factory=dict)

    def params(self) -> dict[str, int]:
        counts = {p: 0 for p in PART_ORDER}
        for name, module in self.parts.items():
            counts[name] = sum(p.numel() for p in module.parameters())
        for name, n in self.extra_params.items():
            counts[name] += n
        counts["total"] = sum(counts[p] for p in PART_ORDER)
        return counts


def _build_vision(spec: dict) -> tuple[nn.Module, int]:
    kind = spec.get("kind", "hf")
    if kind != "hf":
        # vlmkit's own tower, registered by name (Pixtral's rope-vit, Fuyu's patchify).
        tower = VISION_TOWERS.build(kind, VisionConfig(name=kind, config=spec["config"]), pretrained=False)
        return tower, tower.hidden_size
    cfg = _resolve(spec["config_class"])(**spec["config"])
    model = _resolve(spec["model_class"])._from_config(cfg) if hasattr(_resolve(spec["model_class"]), "_from_config") else _resolve(spec["model_class"])(cfg)
    for name in spec.get("drop", []):
        delattr(model, name)
    width = spec.get("output_dim") or cfg.hidden_size
    return model, width


def _build_llm(spec: dict) -> nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = _resolve(spec["config_class"])(**spec["config"])
    return AutoModelForCausalLM.from_config(cfg)


def build_meta(preset: str | Preset) -> MetaModel:
    """Every part at its released shape, on the meta device (a name, an alias or a Preset)."""
    if isinstance(preset, str):
        preset = get_preset(preset)
    d = preset.data
    with torch.device("meta"):
        vision, vision_dim = _build_vision(d["vision"])
        llm = _build_llm(d["llm"])
        llm_dim = llm.get_input_embeddings().embedding_dim
        options = dict(d["connector"]["options"])
        connector = build_connector(d["connector"]["name"], vision_dim, llm_dim, options, grid=tuple(d["image"]["grid"]))
        parts: dict[str, nn.Module] = {"vision": vision, "connector": connector, "llm": llm}
        if preset.fusion == "cross-attention":
            xopts = parse_cross_attention_options(d["cross_attention"])
            fusion = CrossAttentionFusion(llm, connector.out_dim, xopts)
            fusion.detach_hooks()
            parts["cross_attention"] = fusion
    return MetaModel(preset, parts, vision_dim, llm_dim, dict(d.get("extra_params", {})))


def image_processor(meta: MetaModel):
    """The preset's image processor, built from its ProcessorConfig through IMAGE_PROCESSORS.

    Families whose count follows from the image (tiles, native resolution) compute it
    themselves; for the fixed-resolution family the count is whatever the connector makes of
    the feature grid (576 for LLaVA-1.5's MLP over 24x24, 32 for BLIP-2's Q-Former queries).
    """
    config = meta.preset.processor_config()
    tokens = meta.parts["connector"].num_tokens(meta.preset.feature_grid)
    return IMAGE_PROCESSORS.build(config.name, config, tokens_per_image=tokens)


# ---- what one image costs -----------------------------------------------------------------------

def _matmul_params(module: nn.Module, skip: tuple[type, ...] = (nn.Embedding,)) -> int:
    total = 0
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            total += m.weight.numel()
        elif type(m).__name__ == "Conv1D":  # GPT-2-style linear layers
            total += m.weight.numel()
    return total


def decoder_layer_list(llm: nn.Module) -> nn.ModuleList:
    # OPT and MPT keep their layers under names the generic lookup does not try.
    for path in (None, "model.decoder.layers", "transformer.blocks"):
        try:
            return decoder_layers(llm, path)
        except AttributeError:
            continue
    raise AttributeError(f"cannot find the decoder layers of {type(llm).__name__}")


def _decoder_layer_count(llm: nn.Module) -> int:
    return len(decoder_layer_list(llm))


def image_cost(meta: MetaModel) -> dict[str, Any]:
    """Visual tokens and forward FLOPs for one image at the preset's base resolution.

    FLOPs count multiply-adds as 2: every weight matrix a token passes through costs 2 x its
    size per token; attention adds 4 x tokens^2 x width per layer (half of that under a causal
    mask). Vision: all patches through the tower. Prefix fusion: the visual tokens through the
    LLM (prefill). Cross-attention fusion: each block's K/V projections over the memory (the
    text-side cost is per text token, not per image).
    """
    d = meta.preset.data
    img = d["image"]
    rows, cols = img["grid"]
    tiles = img.get("tiles", 1)
    patches_per_tile = rows * cols
    connector = meta.parts["connector"]
    per_tile = connector.num_tokens((rows, cols))
    out_tokens = per_tile * tiles + img.get("extra_tokens", 0)

    vision = meta.parts["vision"]
    vision_layers = [m for m in vision.modules() if isinstance(m, nn.ModuleList)]
    n_vlayers = max((len(m) for m in vision_layers), default=0)
    v_width = getattr(getattr(vision, "config", None), "hidden_size", None) or getattr(vision, "hidden_size", meta.vision_dim)
    if d["vision"].get("kind") == "patchify":
        n_vlayers = 0
    vision_flops = 2 * _matmul_params(vision) * patches_per_tile * tiles + 4 * n_vlayers * patches_per_tile**2 * v_width * tiles

    connector_flops = _connector_flops(connector, meta.vision_dim, (rows, cols)) * tiles

    llm = meta.parts["llm"]
    layers = _decoder_layer_count(llm)
    head = llm.get_output_embeddings()
    llm_layer_params = _matmul_params(llm) - (head.weight.numel() if isinstance(head, nn.Linear) else 0)
    if meta.preset.fusion == "cross-attention":
        fusion = meta.parts["cross_attention"]
        kv = sum(b.attn.k_proj.weight.numel() + b.attn.v_proj.weight.numel() for b in fusion.blocks)
        llm_flops = 2 * kv * out_tokens
        context_tokens = tiles and 1  # one marker slot per image
        memory_tokens = out_tokens
    else:
        llm_flops = 2 * llm_layer_params * out_tokens + 2 * layers * out_tokens**2 * meta.llm_dim
        context_tokens = out_tokens
        memory_tokens = 0
    return {
        "image_size": img["size"],
        "tiles": tiles,
        "feature_grid": [rows, cols],
        "visual_tokens": context_tokens,
        "memory_tokens": memory_tokens,
        "note": img.get("note", ""),
        "flops": {"vision": vision_flops, "connector": connector_flops, "llm": llm_flops,
                  "total": vision_flops + connector_flops + llm_flops},
    }


def _connector_flops(connector: nn.Module, vision_dim: int, grid: tuple[int, int]) -> int:
    """Counted by running the connector on meta tensors under torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        x = torch.empty(1, grid[0] * grid[1], vision_dim)
    with FlopCounterMode(display=False) as counter:
        connector(x, grid)
    return int(counter.get_total_flops())


def trainable_by_stage(meta: MetaModel) -> dict[str, dict[str, int]]:
    counts = meta.params()
    out = {}
    for stage, parts in meta.preset.stages.items():
        out[stage] = {"parts": parts, "trainable": sum(counts[p] for p in parts)}
    return out


def inspect_preset(name: str) -> dict[str, Any]:
    meta = build_meta(name)
    name = meta.preset.name
    counts = meta.params()
    published = meta.preset.published_total
    return {
        "preset": name,
        "family": meta.preset.data["family"],
        "release": meta.preset.data["release"],
        "fusion": meta.preset.fusion,
        "connector": meta.preset.data["connector"]["name"],
        "params": counts,
        "published": {
            "total": published,
            "source": meta.preset.data["published"]["source"],
            "difference": None if not published else (counts["total"] - published) / published,
        },
        "lecture_figures": {part: {"name": n, "params": v} for part, (n, v) in LECTURE_FIGURES.get(name, {}).items()},
        "stages": trainable_by_stage(meta),
        "image": image_cost(meta),
    }
