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
* vision-tower FLOPs, beside the LLM's (`flops` in `--json`): per tower input (a tile, a
  thumbnail, a native-resolution image, a video's temporal patches) of n tokens through a
  transformer tower, `2 * n * P` for its matmul weights P (linear layers and the patch
  embedding, applied once per token) plus `4 * n^2 * w` per attention layer of width w
  (QK^T and AV, no causal mask; a video's temporal patches attend within each frame group);
  a convolutional tower (EfficientNet) is counted by torch's FLOP counter on meta tensors.
  The connector is counted by that counter too. Attention is counted within each view:
  Llama 3.2 Vision's global layers that see all tiles at once are counted per tile.

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

from dataclasses import asdict, dataclass, field, replace
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
    # Hybrid decoders (LFM2's short convolutions between its attention layers): how many layers
    # attend (None: all of them); the others' token mixer keeps a fixed-size state instead of a
    # per-token KV cache.
    attention_layers: int | None = None
    # Decoders whose layers differ (hybrid; mixture-of-experts, where a token passes the router,
    # any shared expert and its top-k experts): the matrix parameters one token passes through
    # in all layers together (None: `layer_params() * layers`).
    active_params: int | None = None

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
    attention = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0
    shapes = [_attention_layer_shape(layer, d, attention, experts) for layer in layers]
    attending = [s for s in shapes if s[0]]
    expert_width = getattr(cfg, "moe_intermediate_size", None)
    if not attending and experts and expert_width:
        # Every layer a mixture of experts held as stacked tensors, with no linear MLP to read:
        # each token runs `num_experts_per_tok` gated experts of the configured width.
        attending = [(True, (getattr(cfg, "num_experts_per_tok", 1) or 1) * expert_width, 3)] * len(layers)
    if not attending:
        ffn = shapes[0][1]
        raise ValueError(f"{where}: cannot read the MLP shape of {type(layers[0]).__name__} (ffn {ffn})")
    _, ffn, mlp_matrices = attending[0]
    varied = {}
    if len(attending) < len(layers) or experts or len(set(attending)) > 1:
        top_k = getattr(cfg, "num_experts_per_tok", 1) or 1
        varied = {"active_params": sum(_active_params(layer, top_k, experts) for layer in layers)}
        if len(attending) < len(layers):  # a hybrid decoder: the other layers mix tokens without attention
            varied["attention_layers"] = len(attending)
    cross = {}
    if cross_attention is not None:
        blocks = cross_attention.blocks
        attn = blocks[0].attn
        name = f"{name} + {len(blocks)} cross-attention layers"
        cross = {"cross_attention_layers": len(blocks), "cross_kv_in": attn.k_proj.in_features,
                 "cross_kv_width": attn.k_proj.out_features + attn.v_proj.out_features}
    return LLMShape(name, len(layers), d, heads, kv_heads, head_dim, ffn, context, gated_mlp=mlp_matrices == 3, **cross, **varied)


def _attention_layer_shape(layer: nn.Module, d: int, attention: int, experts: int = 0) -> tuple[bool, int, int]:
    """(whether the layer reads as attention + MLP, its FFN width, its MLP matrices). Config
    classes name the FFN width differently (intermediate_size, ffn_dim, expansion_ratio); the
    weights do not: the MLP's up projection is the widest d-input matrix, and what is not
    attention is the MLP, 2 (plain) or 3 (gated) matrices of d x ffn. In a mixture-of-experts
    layer the router (d -> experts) is left out and the MLP read is its shared expert."""
    weights = [m.weight.shape for m in _linears(layer) if not (experts and tuple(m.weight.shape) == (experts, d))]
    widest = max((max(s) for s in weights if d in s and max(s) != d), default=0)
    if not widest:
        return False, 0, 0
    # A fused gate + up projection (GLM-4, Phi-3) is one d x 2*ffn matrix: then ffn is half the widest.
    for ffn in (widest, widest // 2):
        mlp_matrices, rest = divmod(sum(s.numel() for s in weights) - attention, d * ffn)
        if not rest and mlp_matrices in (2, 3):
            return True, ffn, mlp_matrices
    return False, widest, 0


def _active_params(layer: nn.Module, top_k: int, experts: int) -> int:
    """The matrix parameters one token passes through in this layer: every linear layer, and top_k
    of the experts held as stacked (experts, in, out) tensors."""
    dense = sum(m.weight.numel() for m in _linears(layer))
    stacked = sum(p.numel() for p in layer.parameters() if p.dim() == 3 and experts and p.shape[0] == experts)
    return dense + stacked * top_k // max(experts, 1)


@dataclass(frozen=True)
class Costing:
    """What the budget needs of a registry preset: its image processor and its LLM shape."""

    name: str
    family: str
    llm: LLMShape
    processor: ImageProcessor
    note: str = ""
    # The real-shape vision tower and connector (meta device), for the tower's FLOPs.
    vision: nn.Module | None = field(default=None, compare=False, repr=False)
    connector: nn.Module | None = field(default=None, compare=False, repr=False)
    vision_dim: int = 0


# A fixed-query connector sets the count whatever the processor does, so it names the family.
_QUERY_CONNECTORS = {"qformer": "Q-Former", "perceiver": "Perceiver"}


@lru_cache(maxsize=None)
def get_preset(name: str) -> Costing:
    """The registry preset `name` (or alias), built on the meta device once per process."""
    meta = presets.build_meta(name)
    p = meta.preset
    family = _QUERY_CONNECTORS.get(p.data["connector"]["name"], p.data["processor"]["name"])
    return Costing(p.name, family, llm_shape(meta), presets.image_processor(meta), p.data.get("tokens_note", ""),
                   meta.parts["vision"], meta.parts["connector"], meta.vision_dim)


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
    # Labelled FLOPs: vision tower, connector and the LLM's prefill (`prefill_flops`), and their sum.
    flops: dict[str, int | None] = field(default_factory=dict)

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
                   llm_shape_of(model.llm, label, cross, str(recipe)), model.image_processor,
                   vision=model.vision, connector=model.connector, vision_dim=model.vision.hidden_size)


def _llm_cost(llm: LLMShape, seq: int, states: int, bytes_per_value: int) -> tuple[int, int]:
    """Prefill FLOPs and KV-cache bytes of `seq` sequence tokens (prefix fusion) or of `states`
    vision states read by the cross-attention layers."""
    if llm.cross_attention_layers:
        flops = 2 * states * llm.cross_attention_layers * llm.cross_kv_in * llm.cross_kv_width
        return flops, states * llm.cross_attention_layers * llm.cross_kv_width * bytes_per_value
    n = seq
    attending = llm.layers if llm.attention_layers is None else llm.attention_layers
    active = llm.layer_params() * llm.layers if llm.active_params is None else llm.active_params
    flops = 2 * n * active + 2 * attending * n * n * llm.heads * llm.head_dim
    return flops, n * attending * 2 * llm.kv_heads * llm.head_dim * bytes_per_value


def image_budget(preset: "str | Costing", width: int, height: int, context: int | None = None,
                 bytes_per_value: int = 2, images: int = 1) -> Budget:
    """What one image costs; with `images` > 1, one image of a prompt that holds that many (the
    processor's own `for_sample`: LLaVA-OneVision reads those at base resolution)."""
    p = preset if isinstance(preset, Costing) else get_preset(preset)
    processor = p.processor.for_sample(images)
    layout: TokenLayout = processor.layout(width, height)
    llm = p.llm
    ctx = context or llm.context
    if ctx <= 0:
        raise ValueError("context must be positive")
    if llm.cross_attention_layers:
        seq = layout.parts.get("sequence_tokens", 1)
        states = layout.parts.get("cross_attention_states_padded", layout.visual_tokens)
        fusion = "cross-attention"
    else:
        seq, states = layout.total_tokens, 0
        fusion = "prefix"
    flops, kv = _llm_cost(llm, seq, states, bytes_per_value)
    notes = [p.note] if p.note else []
    if seq > ctx:
        notes.append(f"the image alone ({seq:,} tokens) exceeds the {ctx:,}-token context")
    vision, connector = tower_flops(p, processor, width, height)
    return Budget(
        preset=p.name, family=p.family, width=width, height=height,
        visual_tokens=layout.visual_tokens, special_tokens=layout.special_tokens, sequence_tokens=seq,
        parts=layout.parts, llm=llm.name, prefill_flops=int(flops), kv_cache_bytes=int(kv),
        context=ctx, context_share=seq / ctx, fusion=fusion, notes=notes,
        flops=_labelled(vision, connector, int(flops)),
    )


def prompt_budget(preset: str | Costing, width: int, height: int, images: int, context: int | None = None,
                  bytes_per_value: int = 2) -> dict[str, Any]:
    """`images` images of this size in one prompt: every count and cost for all of them together
    (prefill attention over the whole sequence, so more than `images` x one image's FLOPs), the
    share of the context and whether they fit; `per_image` is one image's layout in that prompt."""
    if images <= 0:
        raise ValueError(f"the number of images must be positive, got {images}")
    p = preset if isinstance(preset, Costing) else get_preset(preset)
    one = image_budget(p, width, height, context=context, bytes_per_value=bytes_per_value, images=images)
    seq = one.sequence_tokens * images
    states = one.parts.get("cross_attention_states_padded", one.visual_tokens) * images
    llm_flops, kv = _llm_cost(p.llm, seq, states, bytes_per_value)
    vision, connector = (None if f is None else f * images for f in (one.flops["vision"], one.flops["connector"]))
    notes = [p.note] if p.note else []
    if seq > one.context:
        notes.append(f"{images} images ({seq:,} tokens) exceed the {one.context:,}-token context")
    return {
        "preset": p.name, "family": p.family, "fusion": one.fusion, "width": width, "height": height, "images": images,
        "per_image": {"visual_tokens": one.visual_tokens, "special_tokens": one.special_tokens,
                      "sequence_tokens": one.sequence_tokens, "parts": one.parts},
        "visual_tokens": one.visual_tokens * images, "special_tokens": one.special_tokens * images,
        "sequence_tokens": seq, "llm": one.llm, "prefill_flops": int(llm_flops), "kv_cache_bytes": int(kv),
        "context": one.context, "context_share": seq / one.context, "fits": seq <= one.context,
        "flops": _labelled(vision, connector, int(llm_flops)),
        "notes": notes,
    }


def sequence_flops(preset: str | Costing, width: int, height: int, sequence_tokens: int,
                   memory_states: int | None = None) -> dict[str, int | None]:
    """Labelled FLOPs of one prompt of `sequence_tokens` tokens that holds one image of this size
    (the image's slots counted among them under prefix fusion, as a question's prompt encodes): the
    tower and connector on the image, the LLM's prefill over the whole sequence, and under
    cross-attention the blocks' reads of the image's states (`memory_states`, where a built model
    knows them: a fixed-size processor's layout does not)."""
    p = preset if isinstance(preset, Costing) else get_preset(preset)
    one = image_budget(p, width, height)
    llm, _ = _llm_cost(replace(p.llm, cross_attention_layers=0), sequence_tokens, 0, 2)
    if p.llm.cross_attention_layers:
        states = memory_states or one.parts.get("cross_attention_states_padded", one.visual_tokens)
        llm += _llm_cost(p.llm, 0, states, 2)[0]
    return _labelled(one.flops["vision"], one.flops["connector"], int(llm))


def _labelled(vision: int | None, connector: int | None, llm_prefill: int) -> dict[str, int | None]:
    """FLOPs by part; `total` only where every part is known."""
    total = None if vision is None or connector is None else vision + connector + llm_prefill
    return {"vision": vision, "connector": connector, "llm_prefill": llm_prefill, "total": total}


# ---- the vision tower's and the connector's FLOPs ----------------------------------------------

def tower_flops(p: Costing, processor: ImageProcessor, width: int, height: int) -> tuple[int | None, int | None]:
    """(vision tower, connector) FLOPs of one image of this size: each of the views the processor
    makes of it (a blank image of that size, preprocessed) through the real-shape tower. None
    where the processor makes no pixels (the lecture's token-only AnyRes example)."""
    if p.vision is None:
        return None, None
    from PIL import Image

    try:
        views = processor.preprocess(Image.new("RGB", (width, height))).views
    except (ValueError, NotImplementedError):
        return None, None
    vision = connector = 0
    for view in views:
        t, rows, cols = view.grid if view.role == "patches" else (1, *_grid_hw(p.vision, *view.size))
        vision += t * _view_flops(p.vision, view.size if view.role != "patches" else None, rows * cols)
        connector += t * _connector_flops(p.connector, p.vision_dim, (rows, cols))
    return vision, connector


def _grid_hw(tower: nn.Module, height: int, width: int) -> tuple[int, int]:
    if hasattr(tower, "grid_hw"):  # vlmkit's VisionTower
        return tower.grid_hw(height, width)
    patch = tower.config.patch_size  # a preset's Hugging Face vision model
    patch = patch if isinstance(patch, int) else patch[0]
    return height // patch, width // patch


def _is_transformer(tower: nn.Module) -> bool:
    """Whether every convolution of the tower is a patch embedding (kernel == stride: once per
    patch), so its cost is per token; a convolutional network is not."""
    convs = [m for m in tower.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    return all(tuple(m.kernel_size) == tuple(m.stride) for m in convs)


def matmul_params(module: nn.Module) -> int:
    """Weights every token passes through once: linear layers and a patch embedding's kernel."""
    return sum(m.weight.numel() for m in module.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)) or type(m).__name__ == "Conv1D")


def attention_widths(module: nn.Module) -> list[int]:
    """The query width of each attention layer: a module with a `q_proj` (or fused `qkv`) linear."""
    widths = []
    for m in module.modules():
        q, qkv = getattr(m, "q_proj", None), getattr(m, "qkv", None)
        if isinstance(q, nn.Linear):
            widths.append(q.out_features)
        elif isinstance(qkv, nn.Linear):
            widths.append(qkv.out_features // 3)
    return widths


@lru_cache(maxsize=4096)
def _tower_shape(tower: nn.Module) -> tuple[bool, int, int]:
    return _is_transformer(tower), matmul_params(tower), sum(attention_widths(tower))


def _view_flops(tower: nn.Module, size: tuple[int, int] | None, tokens: int) -> int:
    """FLOPs of one view (one frame group) of `tokens` tokens through the tower."""
    transformer, params, width = _tower_shape(tower)
    if transformer or size is None:
        return 2 * tokens * params + 4 * tokens * tokens * width
    return _counted_flops(tower, tuple(size))


@lru_cache(maxsize=4096)
def _counted_flops(tower: nn.Module, size: tuple[int, int]) -> int:
    """A convolutional tower's FLOPs at one input size, from torch's counter on meta tensors."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    copy = _meta_copy(tower).eval()  # eval: BatchNorm's running statistics, as a frozen tower runs
    with FlopCounterMode(display=False) as counter:
        copy(torch.empty(1, 3, *size, device="meta"))
    return int(counter.get_total_flops())


def _meta_copy(module: nn.Module) -> nn.Module:
    import copy

    if next(module.parameters()).device.type == "meta":
        return module
    return copy.deepcopy(module).to("meta")


@lru_cache(maxsize=4096)
def _connector_flops(connector: nn.Module, vision_dim: int, grid: tuple[int, int]) -> int:
    """The connector over one view's feature grid, counted by torch's FLOP counter on meta tensors."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    copy = _meta_copy(connector)
    # Not under no_grad: the counter's backward bookkeeping expects autograd (Q-Former, Perceiver).
    with FlopCounterMode(display=False) as counter:
        copy(torch.empty(1, grid[0] * grid[1], vision_dim, device="meta"), grid)
    return int(counter.get_total_flops())


# The lecture's token-budget table, row by row, next to what the reference code gives.
def lecture_table() -> list[dict[str, Any]]:
    def tok(preset, w, h):
        return get_preset(preset).processor.layout(w, h)

    q_min, q_max = tok("qwen2-vl-7b", 56, 56), tok("qwen2-vl-7b", 4000, 4000)
    iv_tile, iv12, iv40 = tok("internvl2-76b", 448, 448), tok("internvl2-76b", 1344, 1792), tok("internvl2-76b-40tiles", 4480, 1792)
    ml_1, ml_4 = tok("llama-3.2-vision-11b", 560, 560), tok("llama-3.2-vision-11b", 1120, 1120)
    px512, pxmax = tok("pixtral-12b", 512, 512), tok("pixtral-12b", 1024, 1024)
    example, example_shuffled = tok("anyres-seed", 1024, 1024), tok("anyres-seed-shuffle", 1024, 1024)
    nx, iv_1024 = tok("llava-next-7b", 1024, 1024), tok("internvl2-76b", 1024, 1024)
    return [
        dict(model="BLIP-2 / InstructBLIP", lecture="32 / 32", reference=f"{tok('blip2', 640, 480).visual_tokens} / 32",
             agrees=True, detail="Q-Former output length is fixed"),
        dict(model="LLaVA-1.5 (336px)", lecture="576 / 576", reference=f"{tok('llava-1.5-7b', 640, 480).visual_tokens} / 576",
             agrees=True, detail="(336/14)^2"),
        dict(model="Llama 3.2 Vision 11B", lecture="1680 / 6720 (4 tiles x 420 + global)",
             reference=f"{ml_1.visual_tokens} / {ml_4.visual_tokens} vision states (1601 per tile), 1 sequence token",
             agrees=False,
             detail="MllamaImageProcessor + vision model: 40x40 patches + CLS = 1601 states per 560 px tile, at most 4 "
                    "tiles, no global tile; all 4 slots (6,404 states) are computed and masked; the LLM sequence holds "
                    "one <|image|> token"),
        dict(model="InternVL2-76B", lecture="256 (1 tile) / 10,240 (40 tiles)",
             reference=f"{iv_tile.visual_tokens} / {iv12.visual_tokens} at max_num 12 / {iv40.visual_tokens} at max_num 40",
             agrees=False,
             detail="256 per tile agrees; with more than one tile a 448 px thumbnail is added, so 40 tiles cost "
                    "41 x 256 = 10,496"),
        dict(model="Qwen2-VL", lecture="256-16,384",
             reference=f"{q_min.visual_tokens}-{q_max.visual_tokens} (released min/max pixels)",
             agrees=False,
             detail="max agrees (12,845,056 px / 28^2); the minimum is min_pixels 3136 -> 56x56 -> 4 tokens; 256 is only "
                    "the min of the README's suggested min_pixels=256*28*28; transformers' class default caps at 1,280"),
        dict(model="Pixtral-12B", lecture="1024 per tile / ~16,384",
             reference=f"{px512.visual_tokens} at 512 px / {pxmax.visual_tokens} (+{pxmax.special_tokens} break/end) at 1024 px",
             agrees=False,
             detail="512 px -> 32x32 patches agrees; the longest edge is capped at 1024, so at most 64x64 = 4,096"),
        dict(model="AnyRes example (1024x1024)", lecture="2x2 + thumbnail = 4,352; 1,088 after pixel shuffle",
             reference=f"{example.visual_tokens} / {example_shuffled.visual_tokens} (the lecture's 448 px tiles + 224 px global)",
             agrees=True,
             detail=f"the real LLaVA-NeXT (336 px tiles, unpadding, newlines) gives {nx.visual_tokens} for 1024x1024; "
                    f"InternVL2 gives a 3x3 grid + thumbnail = {iv_1024.visual_tokens}"),
        dict(model="Gemini 1.5 Flash", lecture="258 / 3,072", reference="not modelled (closed tokeniser)", agrees=None,
             detail="no reference implementation"),
    ]
