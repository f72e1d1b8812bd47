"""Token budget: what one image costs a given model, before anything is trained or served.

For a preset and an image size this gives the visual-token count (from the same processor
object that preprocesses the pixels, so the promise and the pixels cannot drift apart) and the
cost of those tokens in the preset's LLM:

* prefill FLOPs: `2 * N * P_layer * L` for the dense projections plus `2 * L * N^2 * H*hd` for
  causal attention among the N tokens (QK^T and AV, halved by the causal mask), where
  `P_layer = 2*d*H*hd + 2*d*KV*hd + (3 if gated else 2)*d*ffn`. Embedding and LM head are left
  out: image tokens skip the first and prefill skips the second.
* KV-cache bytes: `N * L * 2 * KV * hd * bytes_per_value` (bf16 by default).
* context share: N / context length.

N is the image's sequence length: visual slots plus the text tokens the family adds around them
([IMG_BREAK], <img>, row tags ...). Cross-attention models (Llama 3.2 Vision) put one token in
the sequence; their cost is the vision states read by the cross-attention layers: the K/V
projections of those states (`2 * S * n_cross * 2*d*KV*hd` FLOPs) and their K/V cache
(`S * n_cross * 2 * KV * hd` values), with d the memory width and KV, hd the blocks' own heads
(Llama 3.2 Vision's equal its LLM's), and S counted over all max_tiles tile slots because that
is what the model computes and caches (padded slots are masked, not skipped).

Everything comes from the preset registry (`vlmkit.presets`, the same entries `vlmkit inspect`
builds): the processor from the preset's ProcessorConfig, its count per image from the family
or, for fixed-resolution presets, from the connector's `num_tokens`; the LLM shape from the
preset's real-shape LLM built on the meta device (nothing allocated).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from torch import nn

from vlmkit import presets
from vlmkit.config import Config, load_config
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.processing.base import ImageProcessor, TokenLayout


@dataclass(frozen=True)
class LLMShape:
    name: str
    layers: int
    d_model: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    context: int
    gated_mlp: bool = True
    cross_attention_layers: int = 0  # > 0: images enter through gated cross-attention
    # Cross-attention blocks: width of the memory their K/V projections read, and K + V output width.
    cross_kv_in: int = 0
    cross_kv_width: int = 0

    def layer_params(self) -> int:
        attn = 2 * self.d_model * self.heads * self.head_dim + 2 * self.d_model * self.kv_heads * self.head_dim
        return attn + (3 if self.gated_mlp else 2) * self.d_model * self.ffn


def _linears(module: nn.Module) -> list[nn.Module]:
    # GPT-2-style Conv1D layers count as linear layers too.
    return [m for m in module.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]


def llm_shape(meta: presets.MetaModel) -> LLMShape:
    """The shape the cost formulas need, read off the preset's real-shape LLM."""
    cross = meta.parts["cross_attention"] if meta.preset.fusion == "cross-attention" else None
    return llm_shape_of(meta.parts["llm"], meta.preset.data["llm"]["label"], cross, meta.preset.name)


def llm_shape_of(llm: nn.Module, name: str, cross_attention: nn.Module | None = None, where: str = "") -> LLMShape:
    """The shape of any built LLM (on the meta device or not), with its cross-attention blocks."""
    cfg = llm.config.get_text_config()
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    context = getattr(cfg, "max_position_embeddings", None) or cfg.max_seq_len  # MPT names it max_seq_len
    layers = presets.decoder_layer_list(llm)
    # Config classes name the FFN width differently (intermediate_size, ffn_dim, expansion_ratio);
    # the first layer's weights do not: the MLP's up projection is its widest d-input matrix, and
    # what is not attention is the MLP, 2 (plain) or 3 (gated) matrices of d x ffn.
    weights = [m.weight.shape for m in _linears(layers[0])]
    ffn = max(max(s) for s in weights if d in s and max(s) != d)
    attention = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim
    mlp_matrices, rest = divmod(sum(s.numel() for s in weights) - attention, d * ffn)
    if rest or mlp_matrices not in (2, 3):
        raise ValueError(f"{where}: cannot read the MLP shape of {type(layers[0]).__name__} (ffn {ffn})")
    cross = {}
    if cross_attention is not None:
        blocks = cross_attention.blocks
        attn = blocks[0].attn
        name = f"{name} + {len(blocks)} cross-attention layers"
        cross = {"cross_attention_layers": len(blocks), "cross_kv_in": attn.k_proj.in_features,
                 "cross_kv_width": attn.k_proj.out_features + attn.v_proj.out_features}
    return LLMShape(name, len(layers), d, heads, kv_heads, head_dim, ffn, context, gated_mlp=mlp_matrices == 3, **cross)


@dataclass(frozen=True)
class Costing:
    """What the budget needs of a registry preset: its image processor and its LLM shape."""

    name: str
    family: str
    llm: LLMShape
    processor: ImageProcessor
    note: str = ""


# A fixed-query connector sets the count whatever the processor does, so it names the family.
_QUERY_CONNECTORS = {"qformer": "Q-Former", "perceiver": "Perceiver"}


@lru_cache(maxsize=None)
def get_preset(name: str) -> Costing:
    """The registry preset `name` (or alias), built on the meta device once per process."""
    meta = presets.build_meta(name)
    p = meta.preset
    family = _QUERY_CONNECTORS.get(p.data["connector"]["name"], p.data["processor"]["name"])
    return Costing(p.name, family, llm_shape(meta), presets.image_processor(meta), p.data.get("tokens_note", ""))


@dataclass
class Budget:
    preset: str
    family: str
    width: int
    height: int
    visual_tokens: int
    special_tokens: int
    sequence_tokens: int
    parts: dict[str, Any]
    llm: str
    prefill_flops: int
    kv_cache_bytes: int
    context: int
    context_share: float
    fusion: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recipe_costing(recipe) -> Costing:
    """What an image costs the model of a recipe (a YAML file or a loaded Config): the model is
    built on the meta device (no weights are allocated or read), so its processor and its LLM
    shape are the ones training would use."""
    import torch

    config = recipe if isinstance(recipe, Config) else load_config(recipe)
    with torch.device("meta"):
        model = VisionLanguageModel.build(config.model, pretrained=False)
    cross = model.parts().get("cross_attention")
    label = f"{config.model.llm.name} ({type(model.llm).__name__})"
    family = _QUERY_CONNECTORS.get(config.model.connector.name, config.model.processor.name)
    return Costing(str(recipe) if not isinstance(recipe, Config) else "recipe", family,
                   llm_shape_of(model.llm, label, cross, str(recipe)), model.image_processor)


def image_budget(preset: "str | Costing", width: int, height: int, context: int | None = None,
                 bytes_per_value: int = 2) -> Budget:
    p = preset if isinstance(preset, Costing) else get_preset(preset)
    layout: TokenLayout = p.processor.layout(width, height)
    llm = p.llm
    ctx = context or llm.context
    if ctx <= 0:
        raise ValueError("context must be positive")
    if llm.cross_attention_layers:
        seq = layout.parts.get("sequence_tokens", 1)
        states = layout.parts.get("cross_attention_states_padded", layout.visual_tokens)
        flops = 2 * states * llm.cross_attention_layers * llm.cross_kv_in * llm.cross_kv_width
        kv = states * llm.cross_attention_layers * llm.cross_kv_width * bytes_per_value
        fusion = "cross-attention"
    else:
        seq = layout.total_tokens
        n = seq
        flops = 2 * n * llm.layer_params() * llm.layers + 2 * llm.layers * n * n * llm.heads * llm.head_dim
        kv = n * llm.layers * 2 * llm.kv_heads * llm.head_dim * bytes_per_value
        fusion = "prefix"
    notes = [p.note] if p.note else []
    if seq > ctx:
        notes.append(f"the image alone ({seq:,} tokens) exceeds the {ctx:,}-token context")
    return Budget(
        preset=p.name, family=p.family, width=width, height=height,
        visual_tokens=layout.visual_tokens, special_tokens=layout.special_tokens, sequence_tokens=seq,
        parts=layout.parts, llm=llm.name, prefill_flops=int(flops), kv_cache_bytes=int(kv),
        context=ctx, context_share=seq / ctx, fusion=fusion, notes=notes,
    )


# The seed deck's token-budget table, row by row, next to what the reference code gives.
def seed_table() -> list[dict[str, Any]]:
    def tok(preset, w, h):
        return get_preset(preset).processor.layout(w, h)

    q_min, q_max = tok("qwen2-vl-7b", 56, 56), tok("qwen2-vl-7b", 4000, 4000)
    iv_tile, iv12, iv40 = tok("internvl2-76b", 448, 448), tok("internvl2-76b", 1344, 1792), tok("internvl2-76b-40tiles", 4480, 1792)
    ml_1, ml_4 = tok("llama-3.2-vision-11b", 560, 560), tok("llama-3.2-vision-11b", 1120, 1120)
    px512, pxmax = tok("pixtral-12b", 512, 512), tok("pixtral-12b", 1024, 1024)
    seed_ex, seed_ps = tok("anyres-seed", 1024, 1024), tok("anyres-seed-shuffle", 1024, 1024)
    nx, iv_1024 = tok("llava-next-7b", 1024, 1024), tok("internvl2-76b", 1024, 1024)
    return [
        dict(model="BLIP-2 / InstructBLIP", seed="32 / 32", reference=f"{tok('blip2', 640, 480).visual_tokens} / 32",
             agrees=True, detail="Q-Former output length is fixed"),
        dict(model="LLaVA-1.5 (336px)", seed="576 / 576", reference=f"{tok('llava-1.5-7b', 640, 480).visual_tokens} / 576",
             agrees=True, detail="(336/14)^2"),
        dict(model="Llama 3.2 Vision 11B", seed="1680 / 6720 (4 tiles x 420 + global)",
             reference=f"{ml_1.visual_tokens} / {ml_4.visual_tokens} vision states (1601 per tile), 1 sequence token",
             agrees=False,
             detail="MllamaImageProcessor + vision model: 40x40 patches + CLS = 1601 states per 560 px tile, at most 4 "
                    "tiles, no global tile; all 4 slots (6,404 states) are computed and masked; the LLM sequence holds "
                    "one <|image|> token"),
        dict(model="InternVL2-76B", seed="256 (1 tile) / 10,240 (40 tiles)",
             reference=f"{iv_tile.visual_tokens} / {iv12.visual_tokens} at max_num 12 / {iv40.visual_tokens} at max_num 40",
             agrees=False,
             detail="256 per tile agrees; with more than one tile a 448 px thumbnail is added, so 40 tiles cost "
                    "41 x 256 = 10,496"),
        dict(model="Qwen2-VL", seed="256-16,384",
             reference=f"{q_min.visual_tokens}-{q_max.visual_tokens} (released min/max pixels)",
             agrees=False,
             detail="max agrees (12,845,056 px / 28^2); the minimum is min_pixels 3136 -> 56x56 -> 4 tokens; 256 is only "
                    "the min of the README's suggested min_pixels=256*28*28; transformers' class default caps at 1,280"),
        dict(model="Pixtral-12B", seed="1024 per tile / ~16,384",
             reference=f"{px512.visual_tokens} at 512 px / {pxmax.visual_tokens} (+{pxmax.special_tokens} break/end) at 1024 px",
             agrees=False,
             detail="512 px -> 32x32 patches agrees; the longest edge is capped at 1024, so at most 64x64 = 4,096"),
        dict(model="AnyRes example (1024x1024)", seed="2x2 + thumbnail = 4,352; 1,088 after pixel shuffle",
             reference=f"{seed_ex.visual_tokens} / {seed_ps.visual_tokens} (seed's 448 px tiles + 224 px global)",
             agrees=True,
             detail=f"the real LLaVA-NeXT (336 px tiles, unpadding, newlines) gives {nx.visual_tokens} for 1024x1024; "
                    f"InternVL2 gives a 3x3 grid + thumbnail = {iv_1024.visual_tokens}"),
        dict(model="Gemini 1.5 Flash", seed="258 / 3,072", reference="not modelled (closed tokeniser)", agrees=None,
             detail="no reference implementation"),
    ]
