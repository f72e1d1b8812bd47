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
(`S * n_cross * 2 * KV * hd` values), with S counted over all max_tiles tile slots because
that is what the model computes and caches (padded slots are masked, not skipped).

The LLM shapes below are the published configs of each preset's language model; this table is
kept here, self-contained, so the calculator needs no model code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from vlmkit.processing.anyres import AnyResProcessor
from vlmkit.processing.base import ImageProcessor, TokenLayout
from vlmkit.processing.dynamic import DynamicTileProcessor
from vlmkit.processing.fixed import FixedResizeProcessor
from vlmkit.processing.idefics3 import Idefics3Processor
from vlmkit.processing.images import CLIP_MEAN, CLIP_STD
from vlmkit.processing.mllama import MllamaProcessor
from vlmkit.processing.pixtral import PixtralProcessor
from vlmkit.processing.qwen2vl import Qwen2VLProcessor


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

    def layer_params(self) -> int:
        attn = 2 * self.d_model * self.heads * self.head_dim + 2 * self.d_model * self.kv_heads * self.head_dim
        return attn + (3 if self.gated_mlp else 2) * self.d_model * self.ffn


VICUNA_7B = LLMShape("Vicuna-7B (Llama-2-7B)", 32, 4096, 32, 32, 128, 11008, 4096)
VICUNA_13B = LLMShape("Vicuna-13B (Llama-2-13B)", 40, 5120, 40, 40, 128, 13824, 4096)
LLAMA3_70B = LLMShape("Hermes-2-Theta-Llama-3-70B", 80, 8192, 64, 8, 128, 28672, 8192)
QWEN2_7B = LLMShape("Qwen2-7B", 28, 3584, 28, 4, 128, 18944, 32768)
NEMO_12B = LLMShape("Mistral-NeMo-12B", 40, 5120, 32, 8, 128, 14336, 131072)
LLAMA31_8B = LLMShape("Llama-3.1-8B", 32, 4096, 32, 8, 128, 14336, 131072)
LLAMA31_8B_XATTN = LLMShape("Llama-3.1-8B + 8 cross-attention layers", 40, 4096, 32, 8, 128, 14336, 131072,
                            cross_attention_layers=8)
SMOLLM2_1_7B = LLMShape("SmolLM2-1.7B", 24, 2048, 32, 32, 64, 8192, 16384)
SMOLLM2_135M = LLMShape("SmolLM2-135M", 30, 576, 9, 3, 64, 1536, 8192)
OPT_2_7B = LLMShape("OPT-2.7B", 32, 2560, 32, 32, 80, 10240, 2048, gated_mlp=False)


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    llm: LLMShape
    make_processor: Callable[[], ImageProcessor]
    note: str = ""


def _fixed(size: int, tokens: int) -> Callable[[], ImageProcessor]:
    return lambda: FixedResizeProcessor(size, tokens, mean=CLIP_MEAN, std=CLIP_STD)


SEED_PINPOINTS = ((448, 896), (896, 448), (896, 896), (1344, 448), (448, 1344), (896, 1344), (1344, 896))

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("blip2", "Q-Former", OPT_2_7B, _fixed(224, 32), "32 learned queries, whatever the image"),
        Preset("llava-1.5-7b", "fixed", VICUNA_7B, _fixed(336, 576), "336 px, 24x24 patches"),
        Preset("llava-1.5-13b", "fixed", VICUNA_13B, _fixed(336, 576), "336 px, 24x24 patches"),
        Preset("llava-next-7b", "anyres", VICUNA_7B, AnyResProcessor, "llava-v1.6 pinpoints, 336 px tiles"),
        Preset("internvl2-76b", "dynamic", LLAMA3_70B, lambda: DynamicTileProcessor(max_num=12),
               "max_dynamic_patch 12 (the released config)"),
        Preset("internvl2-76b-40tiles", "dynamic", LLAMA3_70B, lambda: DynamicTileProcessor(max_num=40),
               "max_num 40, the seed's tile cap"),
        Preset("qwen2-vl-7b", "qwen2vl", QWEN2_7B,
               lambda: Qwen2VLProcessor(min_pixels=3136, max_pixels=12845056),
               "released preprocessor_config: min_pixels 3136, max_pixels 12845056"),
        Preset("pixtral-12b", "pixtral", NEMO_12B, PixtralProcessor, "longest edge 1024, patch 16"),
        Preset("llama-3.2-vision-11b", "mllama", LLAMA31_8B_XATTN, MllamaProcessor,
               "cross-attention: 1 sequence token per image"),
        Preset("idefics3-8b", "idefics3", LLAMA31_8B, Idefics3Processor, "364 px crops, 169 tokens each"),
        Preset("smolvlm", "idefics3", SMOLLM2_1_7B,
               lambda: Idefics3Processor(longest_edge=1536, crop_size=384, patch_size=14, scale_factor=3),
               "SmolVLM-Instruct: 384 px crops, 81 tokens each"),
        Preset("smolvlm-256m", "idefics3", SMOLLM2_135M,
               lambda: Idefics3Processor(longest_edge=2048, crop_size=512, patch_size=16, scale_factor=4),
               "512 px crops, 64 tokens each"),
        Preset("anyres-seed", "anyres", VICUNA_7B,
               lambda: AnyResProcessor(image_size=448, grid_pinpoints=SEED_PINPOINTS, unpad=False,
                                       newline=False, base_size=224),
               "the seed deck's AnyRes example: 448 px tiles (1024 tokens) + 224 px global (256)"),
        Preset("anyres-seed-shuffle", "anyres", VICUNA_7B,
               lambda: AnyResProcessor(image_size=448, grid_pinpoints=SEED_PINPOINTS, unpad=False,
                                       newline=False, base_size=224, pixel_shuffle=2),
               "the same with a 2x2 pixel shuffle (InternVL-style, 1/4 of the tokens)"),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


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


def image_budget(preset: str, width: int, height: int, context: int | None = None,
                 bytes_per_value: int = 2) -> Budget:
    p = get_preset(preset)
    proc = p.make_processor()
    layout: TokenLayout = proc.layout(width, height)
    llm = p.llm
    ctx = context or llm.context
    if ctx <= 0:
        raise ValueError("context must be positive")
    kv_width = 2 * llm.kv_heads * llm.head_dim
    if llm.cross_attention_layers:
        seq = layout.parts.get("sequence_tokens", 1)
        states = layout.parts.get("cross_attention_states_padded", layout.visual_tokens)
        flops = 2 * states * llm.cross_attention_layers * llm.d_model * kv_width
        kv = states * llm.cross_attention_layers * kv_width * bytes_per_value
        fusion = "cross-attention"
    else:
        seq = layout.total_tokens
        n = seq
        flops = 2 * n * llm.layer_params() * llm.layers + 2 * llm.layers * n * n * llm.heads * llm.head_dim
        kv = n * llm.layers * kv_width * bytes_per_value
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
        return get_preset(preset).make_processor().layout(w, h)

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
