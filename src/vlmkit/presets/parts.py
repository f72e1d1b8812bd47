"""The pieces preset entries share: real-shape towers and LLM shapes used by several families,
the processor-config and tiny-variant builders.

Each family's entries live in its folder (`vlmkit/families/<family>/presets.py`): a real shape
(built on the meta device), the image processor that feeds it, and a tiny CPU variant with the
same processor family at toy size. `vlmkit inspect` builds the real shape from an entry, `vlmkit
tokens` builds the entry's processor and reads its LLM shape and connector from the same entry.
Every figure under `published` names where it comes from. Real-shape configs follow each
release's config.json (the Hugging Face conversions where one exists); `docs/presets.md` puts
our per-part counts beside the lecture's figures and explains the differences.

`processor`: the image processor of the release (a ProcessorConfig). Where the token count is
the connector's (fixed resolution, Q-Former, Perceiver) the processor does not state it: `vlmkit
tokens` asks the connector, `num_tokens(image.grid)`. Where a processor option must agree with
the connector (a pixel-shuffle factor), it is derived from the connector options.
`tokens_note`: the remark `vlmkit tokens` prints under the preset.
"""

from __future__ import annotations

from typing import Any


# ---- shared real-shape pieces --------------------------------------------------------------

CLIP_L_336 = {"model_class": "CLIPVisionModel", "config_class": "CLIPVisionConfig",
              "config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14}}


def siglip_so400m(image_size: int) -> dict:
    return {"model_class": "SiglipVisionModel", "config_class": "SiglipVisionConfig",
            "config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                       "image_size": image_size, "patch_size": 14, "vision_use_head": False}}




def llama(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int, tie: bool = False, cls: str = "LlamaConfig",
          *, label: str, **extra) -> dict:
    """`label` names the language model in `vlmkit tokens`; `extra` (e.g. max_position_embeddings,
    which sets the context the token budget reports) goes to the config class."""
    return {"config_class": cls, "label": label,
            "config": {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
                       "num_attention_heads": heads, "num_key_value_heads": kv, "tie_word_embeddings": tie, **extra}}


VICUNA_7B = llama(32064, 4096, 11008, 32, 32, 32, label="Vicuna-7B (Llama-2-7B)", max_position_embeddings=4096)

# ---- image processors ------------------------------------------------------------------------

def processor(name: str, image_size: int, mean, std, resample: str = "bicubic", **options) -> dict[str, Any]:
    """A ProcessorConfig dict: `name` is a family in IMAGE_PROCESSORS, `options` its settings."""
    return {"name": name, "image_size": image_size, "mean": mean, "std": std, "resample": resample, "options": options}


def toy(real: dict[str, Any], image_size: int, **options) -> dict[str, Any]:
    """The real preset's processor family and normalisation at toy size (for the tiny variant)."""
    return {**real, "image_size": image_size, "options": {**real["options"], **options}}



# ---- tiny variants ---------------------------------------------------------------------------

TINY_LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}


def tiny(connector: str, options: dict | None = None, *, processor: dict[str, Any], fusion: str = "prefix", vision: str = "siglip",
         llm: str = "llama", patch: int = 4) -> dict[str, Any]:
    """A ModelConfig dict with the family's connector, fusion and processor at toy width (trains on CPU)."""
    image_size = processor["image_size"]
    if vision in ("siglip", "clip"):
        cfg = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": image_size, "patch_size": patch}
        if vision == "siglip":
            cfg["vision_use_head"] = False
        vis = {"name": "hf-random", "model_type": f"{vision}_vision_model", "config": cfg}
    elif vision == "rope-vit":
        vis = {"name": "rope-vit", "config": {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": patch}}
    else:
        vis = {"name": "patchify", "config": {"patch_size": patch}}
    llm_cfg = dict(TINY_LLM)
    if llm == "gemma":
        llm_cfg["head_dim"] = 16
    return {"vision": vis, "connector": {"name": connector, "options": options or {}},
            "llm": {"name": "hf-random", "model_type": llm, "config": llm_cfg},
            "processor": processor, "fusion": fusion}
