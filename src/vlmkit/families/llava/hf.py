"""LLaVA-1.5 (`llava`): import and export.

A vlmkit model with prefix fusion, an MLP connector without input norm, and a ViT-style
Hugging Face tower (SigLIP, CLIP) is architecturally a `LlavaForConditionalGeneration`:
vision tower -> linear_1 / GELU / linear_2 -> the causal LM, image-token slots overwritten.
Export moves the weights across and writes the processor and a chat template; import goes the
other way, for LLaVA-1.5-style folders.

Three details decide whether logits agree:
- Feature layer. vlmkit's `feature_layer=-1` means the tower's `last_hidden_state`; for SigLIP
  that is *after* the final layer norm, while LLaVA reads `hidden_states[-1]` (before it). The
  export sets the vision config's `tie_last_hidden_states`, which transformers documents as
  the switch that makes `hidden_states[-1]` the final output. CLS handling maps to LLaVA's
  `vision_feature_select_strategy` ("default" drops the first token, "full" keeps all).
- Vocabulary. vlmkit lets the image token id lie past the LM's embedding table (its slots are
  overwritten); LLaVA looks every id up, so the export grows the embeddings and LM head to
  cover it. The new rows are zero and the generation config suppresses the token, so the
  exported model can never emit it.
- Preprocessing. vlmkit's fixed processor ("pad" = LLaVA-1.5's expand-to-square with the mean
  colour, "squash", "crop") maps onto `LlavaImageProcessor` options.

The language model is written as a plain transformers folder inside the checkpoint (`llm/`), the
vision tower and projector as checkpoint weights; pickled weights are never loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import torch

from vlmkit.checkpoint import save_checkpoint
from vlmkit.config import load_config
from vlmkit.hf.folder import (
    ExportError,
    auto_config,
    check_in_vocab,
    check_weight_files,
    hf_config_dict,
    load_exact,
    load_tokenizer,
    read_json,
    warn_non_finite,
)
from vlmkit.hf.output_folder import publish, staging_folder
from vlmkit.hf.reference import vision_feature_settings
from vlmkit.hf.registry import HFFamily
from vlmkit.hf.templates import CONTENT_LIST_PREAMBLE, chat_template, template_source, usable_template
from vlmkit.hf.writing import keep_saved_tokenizer_class, stop_ids
from vlmkit.model.connectors.mlp import MLPConnector
from vlmkit.model.vision import HFVisionTower
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.paths import offline
from vlmkit.processing.base import VisualBatch
from vlmkit.utils import respect_umask


def export_blockers(model) -> list[str]:
    """Every reason the model cannot become a LLaVA folder (empty: it can), so one run names them all."""
    cfg = model.config
    blockers = []
    if cfg.fusion != "prefix":
        blockers.append(f"fusion={cfg.fusion!r}: LLaVA only has prefix fusion (image embeddings in the token sequence)")
    if not isinstance(model.connector, MLPConnector):
        blockers.append(f"connector {cfg.connector.name!r}: LLaVA's projector is the 2-layer GELU MLP ('mlp' connector)")
    elif not isinstance(model.connector.norm, torch.nn.Identity):
        blockers.append("the MLP connector has input_norm=true; LLaVA's projector has no input layer norm")
    if cfg.connector.output_norm != "none":
        blockers.append(f"connector output_norm={cfg.connector.output_norm!r}; LLaVA's projector has no output norm")
    if not isinstance(model.vision, HFVisionTower):
        blockers.append(
            f"vision tower {cfg.vision.name!r} cannot be exported: LLaVA needs a Hugging Face ViT-style tower "
            "(SigLIP or CLIP via the 'hf' / 'hf-random' towers); EfficientNet and other CNN towers have no LLaVA equivalent"
        )
    elif model.vision.model.config.model_type not in ("siglip_vision_model", "clip_vision_model"):
        blockers.append(f"vision tower type {model.vision.model.config.model_type!r}: export supports SigLIP and CLIP vision towers")
    if cfg.processor.name != "fixed":
        blockers.append(f"processor {cfg.processor.name!r}: LLaVA (1.5) uses one fixed-size image; use the 'fixed' processor")
    return blockers


def check_exportable(model) -> None:
    blockers = export_blockers(model)
    if len(blockers) == 1:
        raise ExportError(blockers[0])
    if blockers:
        raise ExportError(f"{len(blockers)} things block the export:\n" + "\n".join(f"  - {b}" for b in blockers))


@torch.no_grad()
def to_llava(model):
    """An in-memory `LlavaForConditionalGeneration` with this model's weights, plus its vocab size."""
    from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

    check_exportable(model)
    tower = model.vision
    vision_cfg = tower.model.config
    text_cfg = model.llm.config
    layer, strategy, tie_last = vision_feature_settings(model)
    old_vocab = model.llm.get_input_embeddings().num_embeddings
    vocab = max(old_vocab, model.image_token_id + 1)

    vision_dict = hf_config_dict(vision_cfg)
    vision_dict["tie_last_hidden_states"] = tie_last
    text_dict = hf_config_dict(text_cfg)
    text_dict["vocab_size"] = vocab
    config = LlavaConfig(
        vision_config=AutoConfig.for_model(vision_cfg.model_type, **vision_dict),
        text_config=AutoConfig.for_model(text_cfg.model_type, **text_dict),
        image_token_index=model.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=layer,
        image_seq_length=model.tokens_per_image,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_cfg, "tie_word_embeddings", False)),
    )
    llava = LlavaForConditionalGeneration(config).eval()
    inner = llava.model
    load_exact(inner.vision_tower, tower.model.state_dict(), "vision tower")
    proj = model.connector
    load_exact(inner.multi_modal_projector, {
        "linear_1.weight": proj.fc1.weight, "linear_1.bias": proj.fc1.bias,
        "linear_2.weight": proj.fc2.weight, "linear_2.bias": proj.fc2.bias,
    }, "projector")
    text_state = dict(model.llm.base_model.state_dict())
    text_state["embed_tokens.weight"] = _grow(text_state["embed_tokens.weight"], vocab)
    load_exact(inner.language_model, text_state, "language model")
    head = model.llm.get_output_embeddings()
    if head.bias is not None:
        raise ExportError("the LM head has a bias; LLaVA's lm_head has none")
    if not config.tie_word_embeddings:
        llava.lm_head.weight.copy_(_grow(head.weight, vocab))
    else:
        llava.tie_weights()
    return llava, vocab


def _grow(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if weight.shape[0] >= rows:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


def _image_processor(model):
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    p = model.config.processor
    fit = p.options.get("fit", "pad")
    size = p.image_size
    resample = {"bicubic": 3, "bilinear": 2, "nearest": 0}[p.resample]
    common = dict(image_mean=list(p.mean), image_std=list(p.std), resample=resample, do_convert_rgb=True,
                  do_rescale=True, rescale_factor=1 / 255, do_normalize=True)
    if fit == "pad":
        return LlavaImageProcessorPil(do_pad=True, size={"height": size, "width": size}, do_center_crop=False, **common)
    if fit == "squash":
        return LlavaImageProcessorPil(do_pad=False, size={"height": size, "width": size}, do_center_crop=False, **common)
    return LlavaImageProcessorPil(do_pad=False, size={"shortest_edge": size}, do_center_crop=True, crop_size={"height": size, "width": size}, **common)


def export_llava(model, out: str | Path) -> Path:
    """Write `out` as a transformers LLaVA folder (weights, config, processor, chat template)."""
    from transformers import GenerationConfig, LlavaProcessor

    out = Path(out)
    llava, vocab = to_llava(model)
    tokenizer = model.tokenizer
    template = tokenizer.chat_template or ""
    if not isinstance(template, str):
        raise ExportError("the tokenizer has several named chat templates; export supports one")
    chat_template = CONTENT_LIST_PREAMBLE + template
    tower = model.vision
    processor = LlavaProcessor(
        image_processor=_image_processor(model),
        tokenizer=tokenizer,
        patch_size=tower.patch_size,
        vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
        chat_template=chat_template,
        image_token=model.config.image_token,
        num_additional_image_tokens=1 if tower.has_cls else 0,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    llava.generation_config = GenerationConfig(
        eos_token_id=stop_ids(tokenizer), pad_token_id=pad_id, bos_token_id=tokenizer.bos_token_id,
        # The grown vocabulary rows are placeholders: never generate the image token.
        suppress_tokens=[model.image_token_id], do_sample=False,
    )
    tmp = staging_folder(out)
    try:
        llava.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "vlmkit_export.json").write_text(json.dumps({"vocab_size": vocab, "vlmkit_config": model.config.model_dump(mode="json")}, indent=2))
        respect_umask(tmp)  # mkdtemp made it 0700
        return publish(tmp, out, command="export-hf")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap: the previous export


@torch.no_grad()
def verify_export(model, folder: str | Path, seed: int = 0) -> float:
    """Largest |logit difference| between vlmkit and the reloaded export on one image prompt."""
    from transformers import LlavaForConditionalGeneration

    offline()
    llava = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    size = model.config.processor.image_size
    pixels = torch.randn(1, 3, size, size, generator=g)
    text = model.tokenizer.encode("Describe the image.", add_special_tokens=False)
    ids = torch.tensor([[model.image_token_id] * model.tokens_per_image + text])
    ours = model(ids.to(model.device), VisualBatch.of_pixels(pixels)).logits.float().cpu()
    theirs = llava(input_ids=ids, pixel_values=pixels).logits.float()[..., : ours.shape[-1]]
    return float((ours - theirs).abs().max())


def _check_llava_config(folder: Path, cfg) -> int:
    """Refuse what vlmkit cannot reproduce; the vision feature layer in vlmkit's numbering."""
    if cfg.model_type != "llava":
        raise ExportError(f"{folder} holds a {cfg.model_type!r} model; import supports LLaVA (LlavaForConditionalGeneration)")
    vision_cfg = cfg.vision_config
    if vision_cfg.model_type not in ("siglip_vision_model", "clip_vision_model"):
        raise ExportError(f"vision tower {vision_cfg.model_type!r}: import supports SigLIP and CLIP towers")
    if not isinstance(cfg.vision_feature_layer, int):
        raise ExportError(f"vision_feature_layer={cfg.vision_feature_layer}: concatenating several layers has no vlmkit equivalent")
    has_cls = vision_cfg.model_type.startswith("clip")
    if (cfg.vision_feature_select_strategy == "default") != has_cls:
        raise ExportError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} with a "
                          f"{vision_cfg.model_type} tower: vlmkit drops the CLS token exactly when the tower has one")
    if cfg.projector_hidden_act != "gelu":
        raise ExportError(f"projector activation {cfg.projector_hidden_act!r}: vlmkit's MLP connector uses exact GELU")
    feature_layer = cfg.vision_feature_layer
    if feature_layer == -1 and not getattr(vision_cfg, "tie_last_hidden_states", False):
        # LLaVA reads hidden_states[-1], the last layer's output before any final norm; vlmkit's
        # -1 means the tower's final output. A positive index picks the same tensor as LLaVA.
        feature_layer = vision_cfg.num_hidden_layers
    return feature_layer


class _FolderProcessor(NamedTuple):
    settings: dict  # the image processor's
    fit: str
    resample: str
    image_token: str


def _llava_processor_settings(folder: Path) -> _FolderProcessor:
    """The image processor settings and the image token from the folder's processor files."""
    processor_cfg = read_json(folder / "processor_config.json")
    # transformers 5 nests the image processor inside processor_config.json; older folders keep
    # it in preprocessor_config.json.
    image_processor = processor_cfg.get("image_processor") or read_json(folder / "preprocessor_config.json")
    fit = "pad" if image_processor.get("do_pad") else ("crop" if image_processor.get("do_center_crop") else "squash")
    resample = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(image_processor.get("resample", 3), "bicubic")
    return _FolderProcessor(image_processor, fit, resample, processor_cfg.get("image_token", "<image>"))


def _load_llava(folder: Path):
    """The folder's LlavaForConditionalGeneration in float32, from checked safetensors only."""
    # transformers is heavy: loaded only when a folder is imported
    from transformers import LlavaForConditionalGeneration

    # The safetensors files are checked from their headers first (inside the folder, float
    # weights, as large as the config says) and a bad one is named; transformers then loads them,
    # safetensors only: it would otherwise fall back to unpickling pytorch_model.bin.
    check_weight_files(folder)
    try:
        llava = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32,
                                                              use_safetensors=True).eval()
    except Exception as e:  # a corrupt file, or a shape or key mismatch transformers finds
        raise ExportError(f"{folder}: the LLaVA weights do not load ({type(e).__name__}: {e})") from None
    warn_non_finite(folder, llava.state_dict())
    return llava


def _llava_recipe(llava, vision_cfg, feature_layer: int, processor: _FolderProcessor, staged_llm: Path) -> dict:
    """The vlmkit recipe of the imported model: the HF tower, the MLP connector, the staged LLM
    and the fixed processor with the folder's settings."""
    image_processor = processor.settings
    # The vision tower config goes in whole; it is rebuilt from it, weights from the checkpoint.
    vision_dict = hf_config_dict(vision_cfg)
    return {"model": {
        "vision": {"name": "hf-random", "model_type": vision_cfg.model_type, "config": vision_dict, "feature_layer": feature_layer},
        "connector": {"name": "mlp", "options": {"hidden_size": llava.model.multi_modal_projector.linear_1.out_features}},
        "llm": {"name": "hf", "path": str(staged_llm)},
        "processor": {"name": "fixed", "image_size": vision_cfg.image_size, "mean": image_processor.get("image_mean", [0.5] * 3),
                      "std": image_processor.get("image_std", [0.5] * 3), "resample": processor.resample,
                      "options": {"fit": processor.fit}},
        "image_token": processor.image_token,
    }}


def _load_vision_and_projector(model, llava) -> None:
    load_exact(model.vision.model, llava.model.vision_tower.state_dict(), "vision tower")
    p = llava.model.multi_modal_projector
    zeros = lambda n: torch.zeros(n)  # noqa: E731  (bias-free projectors are bias = 0)
    load_exact(model.connector, {
        "fc1.weight": p.linear_1.weight, "fc1.bias": p.linear_1.bias if p.linear_1.bias is not None else zeros(p.linear_1.out_features),
        "fc2.weight": p.linear_2.weight, "fc2.bias": p.linear_2.bias if p.linear_2.bias is not None else zeros(p.linear_2.out_features),
    }, "projector")


def import_llava(folder: str | Path, out: str | Path) -> Path:
    """A LLaVA(-1.5)-style transformers folder -> a vlmkit checkpoint.

    The language model is written as a plain transformers folder inside the checkpoint (`llm/`,
    referenced relative to the checkpoint, so its tokenizer, and with it the image token id, come from
    there); the vision tower and projector are checkpoint weights.
    """
    offline()
    folder, out = Path(folder), Path(out).resolve()
    cfg = auto_config(folder)
    feature_layer = _check_llava_config(folder, cfg)
    vision_cfg, text_cfg = cfg.vision_config, cfg.text_config
    processor = _llava_processor_settings(folder)
    image_token = processor.image_token
    llava = _load_llava(folder)
    tokenizer = load_tokenizer(folder)
    check_in_vocab(tokenizer, image_token, f"{folder} (processor_config.json image_token)")
    template = usable_template(chat_template(folder, tokenizer), tokenizer, image_token, template_source(folder))
    if template:
        tokenizer.chat_template = template

    tmp = staging_folder(out)
    try:
        staged_llm = tmp / "llm"
        causal = _causal_lm(llava, text_cfg)
        causal.save_pretrained(staged_llm, safe_serialization=True)
        tokenizer.save_pretrained(staged_llm)
        config = load_config(_llava_recipe(llava, vision_cfg, feature_layer, processor, staged_llm))
        model = VisionLanguageModel.build(config.model)
        # The LM weights live in llm/; only the vision tower and projector go in the weights file.
        model.set_trainable(["vision", "connector"])
        if model.image_token_id != cfg.image_token_index:
            raise ExportError(f"the tokenizer maps {image_token!r} to {model.image_token_id}, the config says {cfg.image_token_index}")
        _load_vision_and_projector(model, llava)
        config.train.max_length = int(getattr(text_cfg, "max_position_embeddings", 2048) or 2048)
        keep_saved_tokenizer_class(model, staged_llm)
        ckpt = save_checkpoint(tmp / "ckpt", model, config, meta={"imported_from": str(folder.resolve())}, inside=("llm",))
        shutil.move(str(staged_llm), ckpt / "llm")
        respect_umask(ckpt)
        return publish(ckpt, out, command="import-hf", source=folder.resolve())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _causal_lm(llava, text_cfg):
    """LLaVA's language model + lm_head as a standalone causal LM."""
    from transformers import AutoModelForCausalLM

    causal = AutoModelForCausalLM.from_config(text_cfg).eval()
    with torch.no_grad():
        causal.base_model.load_state_dict(llava.model.language_model.state_dict())
        causal.get_output_embeddings().weight.copy_(llava.lm_head.weight)
    return causal


# Specificity 0: every other family that exports a `model_type: llava` folder (Pixtral) is asked first.
LLAVA = HFFamily(("llava",), "LLaVA-1.5 (LlavaForConditionalGeneration)", import_llava,
                 lambda model, out: export_llava(model, out), lambda model: True, specificity=0, verify=verify_export)
