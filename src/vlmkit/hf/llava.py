"""Hugging Face LLaVA export and import.

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
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from vlmkit.config import load_config
from vlmkit.hf.output_folder import publish, staging_folder
from vlmkit.paths import offline
from vlmkit.utils import respect_umask


class ExportError(ValueError):
    """A model that cannot be expressed as the other side's architecture; says why."""


# Keys of a Hugging Face config dict that describe the file, not the architecture.
_FILE_KEYS = ("architectures", "transformers_version", "_name_or_path", "model_type", "auto_map", "output_hidden_states",
              "return_dict", "use_cache", "torch_dtype", "dtype", "_attn_implementation_autoset")

# Chat template prefix: turns OpenAI / processor-style content lists into the plain strings the
# LM's own template expects, with "<image>" where each image goes (vlmkit's prompt layout).
_CONTENT_LIST_PREAMBLE = (
    "{%- set _ns = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set _ns.msgs = _ns.msgs + [m] -%}"
    "{%- else -%}{%- set _p = namespace(t=[]) -%}"
    "{%- for part in m['content'] -%}"
    "{%- if part['type'] in ['image', 'image_url'] -%}{%- set _p.t = _p.t + ['<image>'] -%}"
    "{%- elif part['type'] == 'text' -%}{%- set _p.t = _p.t + [part['text']] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set _ns.msgs = _ns.msgs + [{'role': m['role'], 'content': _p.t | join('\\n')}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = _ns.msgs -%}"
)


def _hf_config_dict(cfg) -> dict:
    d = cfg.to_dict()
    return {k: v for k, v in d.items() if k not in _FILE_KEYS}


def export_blockers(model) -> list[str]:
    """Every reason the model cannot become a LLaVA folder (empty: it can), so one run names them all."""
    from vlmkit.model.connectors.mlp import MLPConnector
    from vlmkit.model.vision import HFVisionTower

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


def _vision_feature_settings(model) -> tuple[int, str, bool]:
    """(vision_feature_layer, vision_feature_select_strategy, tie_last_hidden_states)."""
    tower = model.vision
    strategy = "default" if tower.has_cls else "full"
    if tower.feature_layer == -1:
        return -1, strategy, True
    return tower.feature_layer, strategy, False


@torch.no_grad()
def to_llava(model):
    """An in-memory `LlavaForConditionalGeneration` with this model's weights, plus its vocab size."""
    from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

    check_exportable(model)
    tower = model.vision
    vision_cfg = tower.model.config
    text_cfg = model.llm.config
    layer, strategy, tie_last = _vision_feature_settings(model)
    old_vocab = model.llm.get_input_embeddings().num_embeddings
    vocab = max(old_vocab, model.image_token_id + 1)

    vision_dict = _hf_config_dict(vision_cfg)
    vision_dict["tie_last_hidden_states"] = tie_last
    text_dict = _hf_config_dict(text_cfg)
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
    _load_exact(inner.vision_tower, tower.model.state_dict(), "vision tower")
    proj = model.connector
    _load_exact(inner.multi_modal_projector, {
        "linear_1.weight": proj.fc1.weight, "linear_1.bias": proj.fc1.bias,
        "linear_2.weight": proj.fc2.weight, "linear_2.bias": proj.fc2.bias,
    }, "projector")
    text_state = dict(model.llm.base_model.state_dict())
    text_state["embed_tokens.weight"] = _grow(text_state["embed_tokens.weight"], vocab)
    _load_exact(inner.language_model, text_state, "language model")
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


def _load_exact(module, state: dict, what: str) -> None:
    target = module.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    # Non-persistent buffers (position ids) are rebuilt by the module itself.
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ExportError(f"{what}: weights do not map onto LLaVA (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for key, value in state.items():
        if key in target:
            if target[key].shape != value.shape:
                raise ExportError(f"{what}: {key} has shape {tuple(value.shape)}, LLaVA expects {tuple(target[key].shape)}")
            target[key].copy_(value)


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
    chat_template = _CONTENT_LIST_PREAMBLE + template
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
        eos_token_id=_stop_ids(tokenizer), pad_token_id=pad_id, bos_token_id=tokenizer.bos_token_id,
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


def _stop_ids(tokenizer) -> list[int]:
    from vlmkit.generate import _extra_stop_ids

    return sorted({i for i in [tokenizer.eos_token_id, *_extra_stop_ids(tokenizer)] if i is not None})


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
    ours = model(ids.to(model.device), pixel_values=pixels).logits.float().cpu()
    theirs = llava(input_ids=ids, pixel_values=pixels).logits.float()[..., : ours.shape[-1]]
    return float((ours - theirs).abs().max())


# ---- import -------------------------------------------------------------------------------------


def import_llava(folder: str | Path, out: str | Path) -> Path:
    """A LLaVA(-1.5)-style transformers folder -> a vlmkit checkpoint.

    The language model is written as a plain transformers folder inside the checkpoint (`llm/`,
    referenced by absolute path, so its tokenizer, and with it the image token id, come from
    there); the vision tower and projector are checkpoint weights.
    """
    from transformers import LlavaForConditionalGeneration

    from vlmkit.hf.importer import auto_config, check_in_vocab, check_weight_files, load_tokenizer, warn_non_finite
    from vlmkit.model.vlm import VisionLanguageModel
    from vlmkit.checkpoint import save_checkpoint

    offline()
    folder, out = Path(folder), Path(out).resolve()
    cfg = auto_config(folder)
    if cfg.model_type != "llava":
        raise ExportError(f"{folder} holds a {cfg.model_type!r} model; import supports LLaVA (LlavaForConditionalGeneration)")
    vision_cfg, text_cfg = cfg.vision_config, cfg.text_config
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
    processor_cfg = _read_json(folder / "processor_config.json")
    # transformers 5 nests the image processor inside processor_config.json; older folders keep
    # it in preprocessor_config.json.
    image_processor = processor_cfg.get("image_processor") or _read_json(folder / "preprocessor_config.json")
    fit = "pad" if image_processor.get("do_pad") else ("crop" if image_processor.get("do_center_crop") else "squash")
    resample = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(image_processor.get("resample", 3), "bicubic")
    image_token = processor_cfg.get("image_token", "<image>")

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
    tokenizer = load_tokenizer(folder)
    check_in_vocab(tokenizer, image_token, f"{folder} (processor_config.json image_token)")
    template = _usable_template(_chat_template(folder, tokenizer), tokenizer, image_token, _template_source(folder))
    if template:
        tokenizer.chat_template = template

    tmp = staging_folder(out)
    try:
        llm_dir = out / "llm"
        staged_llm = tmp / "llm"
        causal = _causal_lm(llava, text_cfg)
        causal.save_pretrained(staged_llm, safe_serialization=True)
        tokenizer.save_pretrained(staged_llm)
        # The vision tower config goes in whole; it is rebuilt from it, weights from the checkpoint.
        vision_dict = _hf_config_dict(vision_cfg)
        config = load_config({"model": {
            "vision": {"name": "hf-random", "model_type": vision_cfg.model_type, "config": vision_dict, "feature_layer": feature_layer},
            "connector": {"name": "mlp", "options": {"hidden_size": llava.model.multi_modal_projector.linear_1.out_features}},
            "llm": {"name": "hf", "path": str(staged_llm)},
            "processor": {"name": "fixed", "image_size": vision_cfg.image_size, "mean": image_processor.get("image_mean", [0.5] * 3),
                          "std": image_processor.get("image_std", [0.5] * 3), "resample": resample, "options": {"fit": fit}},
            "image_token": image_token,
        }})
        model = VisionLanguageModel.build(config.model)
        # The LM weights live in llm/; only the vision tower and projector go in the weights file.
        model.set_trainable(["vision", "connector"])
        if model.image_token_id != cfg.image_token_index:
            raise ExportError(f"the tokenizer maps {image_token!r} to {model.image_token_id}, the config says {cfg.image_token_index}")
        _load_exact(model.vision.model, llava.model.vision_tower.state_dict(), "vision tower")
        p = llava.model.multi_modal_projector
        zeros = lambda n: torch.zeros(n)  # noqa: E731  (bias-free projectors are bias = 0)
        _load_exact(model.connector, {
            "fc1.weight": p.linear_1.weight, "fc1.bias": p.linear_1.bias if p.linear_1.bias is not None else zeros(p.linear_1.out_features),
            "fc2.weight": p.linear_2.weight, "fc2.bias": p.linear_2.bias if p.linear_2.bias is not None else zeros(p.linear_2.out_features),
        }, "projector")
        config.model.llm.path = str(llm_dir)
        config.train.max_length = int(getattr(text_cfg, "max_position_embeddings", 2048) or 2048)
        ckpt = save_checkpoint(tmp / "ckpt", model, config, meta={"imported_from": str(folder.resolve())})
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


def _chat_template(folder: Path, tokenizer) -> str | None:
    """The processor's chat template if the folder has one (LLaVA folders keep it there)."""
    jinja, packed = folder / "chat_template.jinja", folder / "chat_template.json"
    if jinja.is_file():
        try:
            return jinja.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ExportError(f"{jinja} is not UTF-8 text (byte {e.start})") from None
    if packed.is_file():
        template = _read_json(packed).get("chat_template")
        if not isinstance(template, str):
            raise ExportError(f"{packed}: chat_template must be a string, not {json.dumps(template)[:80]}")
        return template
    return tokenizer.chat_template


def _template_source(folder: Path) -> str:
    """The file the folder's chat template comes from, for error messages."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if (folder / name).is_file():
            return str(folder / name)
    return f"{folder / 'tokenizer_config.json'} (chat_template)"


class TemplateTimeout(ExportError):
    """A chat template that renders a two-turn probe for longer than any real one needs."""


# Rendering a real chat template takes milliseconds; a template with nested huge loops would hold
# import-hf forever.
TEMPLATE_SECONDS = 5.0


class _TemplateClock:
    """A time budget shared by every probe render of one template. Rendering runs jinja's compiled
    Python, so a trace function can stop it in any thread (a signal could not): each traced event
    checks the deadline and raises TemplateTimeout inside the render."""

    def __init__(self, source: str, seconds: float = TEMPLATE_SECONDS):
        import time

        self.source, self.seconds, self.deadline = source, seconds, time.monotonic() + seconds

    def render(self, tokenizer, messages, template: str) -> str:
        import sys
        import time

        def trace(frame, event, arg):
            if time.monotonic() > self.deadline:
                raise TemplateTimeout(f"{self.source}: the chat template did not render a two-turn probe in {self.seconds:g} s "
                                      "(runaway loops?); fix or remove it")
            return trace

        previous = sys.gettrace()
        sys.settrace(trace)
        try:
            return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
        finally:
            sys.settrace(previous)


# LLaVA processor templates iterate over content parts; vlmkit renders plain-string contents
# (with "<image>" inline). Wrapping each string as one text part lets such a template render it.
_STRING_TO_PARTS_PREAMBLE = (
    "{%- set _ns = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}"
    "{%- set _ns.msgs = _ns.msgs + [{'role': m['role'], 'content': [{'type': 'text', 'text': m['content']}]}] -%}"
    "{%- else -%}{%- set _ns.msgs = _ns.msgs + [m] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = _ns.msgs -%}"
)


def _image_parts_template(template: str, image_token: str) -> str:
    """`template` reading each string turn as content parts: a turn that starts with
    IMAGE_PART_MARK (the chat processor writes it before a turn that opens with an image) as an
    image part then its text, any other as one text part. The image part renders as
    `image_token`; the text after it is tagged so the wrapper removes that rendering, leaving the
    expanded image text in place."""
    from vlmkit.processing.prompt import IMAGE_PART_MARK, IMAGE_PARTS_FLAG

    tag, token, mark = (json.dumps(x, ensure_ascii=False) for x in ("\ue001", image_token, IMAGE_PART_MARK))
    return (
        "{#- " + IMAGE_PARTS_FLAG + " -#}"
        "{%- set _ns = namespace(msgs=[]) -%}"
        "{%- for m in messages -%}"
        "{%- if m['content'] is string -%}"
        "{%- set _p = namespace(items=[]) -%}"
        "{%- for piece in m['content'].split(" + mark + ") -%}"
        "{%- if not loop.first -%}{%- set _p.items = _p.items + [{'type': 'image'}, {'type': 'text', 'text': " + tag + " + piece}]"
        " -%}{%- elif piece or loop.length == 1 -%}{%- set _p.items = _p.items + [{'type': 'text', 'text': piece}] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set _ns.msgs = _ns.msgs + [{'role': m['role'], 'content': _p.items}] -%}"
        "{%- else -%}{%- set _ns.msgs = _ns.msgs + [m] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = _ns.msgs -%}"
        "{% set _vlmkit_out %}" + template + "{% endset %}{{ _vlmkit_out | replace(" + token + " + " + tag + ", '') }}"
    )


def _plain_of_image_parts(template: str) -> str | None:
    """The folder's template inside an `_image_parts_template` wrapper (None for any other)."""
    from vlmkit.processing.prompt import IMAGE_PARTS_FLAG

    head, tail = "{% set _vlmkit_out %}", "{% endset %}{{ _vlmkit_out | replace("
    if not template.startswith("{#- " + IMAGE_PARTS_FLAG) or head not in template:
        return None
    return template.split(head, 1)[1].rsplit(tail, 1)[0]


def _needs_image_parts(template: str, chosen: str | None, tokenizer, image_token: str, clock: _TemplateClock) -> str | None:
    """The image-parts wrapper, where the template renders a turn that starts with an image
    differently from the same turn as one string (and the wrapper reproduces the parts exactly)."""
    from vlmkit.processing.prompt import IMAGE_PART_MARK

    def render(messages, candidate):
        try:
            return clock.render(tokenizer, messages, candidate)
        except TemplateTimeout:
            raise
        except Exception:  # a template that cannot render the input raises inside jinja
            return None

    listed = render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "B"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "C"}]},
                     {"role": "user", "content": [{"type": "text", "text": "D"}, {"type": "image"}]}], template)
    if listed is None or f"{image_token}B" not in listed:
        return None
    if chosen and render([{"role": "user", "content": f"{image_token}B"}, {"role": "assistant", "content": "C"},
                          {"role": "user", "content": f"D{image_token}"}], chosen) == listed:
        return None  # the string form already renders what the processor does
    candidate = _image_parts_template(template, image_token)
    marked = render([{"role": "user", "content": f"{IMAGE_PART_MARK}{image_token}B"}, {"role": "assistant", "content": "C"},
                     {"role": "user", "content": f"D{image_token}"}], candidate)
    return candidate if marked == listed else None


def _usable_template(template: str | None, tokenizer, image_token: str, source: str = "the folder's chat template") -> str | None:
    """The template as is if it renders string contents, else wrapped so that it does; wrapped to
    read images as content parts where a turn's leading image changes the rendering. `source`
    (the file it came from) names it in errors; rendering is bounded in time (TEMPLATE_SECONDS)."""
    if not template:
        return None
    if not isinstance(template, str):
        raise ExportError(f"{source}: several named chat templates; vlmkit imports one")
    clock = _TemplateClock(source)
    try:
        chosen = _string_template(template, tokenizer, image_token, clock)
    except TemplateTimeout:
        raise
    except ExportError:
        chosen = None
    parts = _needs_image_parts(template, chosen, tokenizer, image_token, clock)
    if parts:
        return parts
    if chosen is None:
        raise ExportError(f"{source}: the chat template renders neither plain-string nor content-list messages with text intact")
    return chosen


def _string_template(template: str, tokenizer, image_token: str, clock: _TemplateClock | None = None) -> str:
    """The template as is if it renders string contents, else wrapped so that it does."""
    clock = clock or _TemplateClock("the folder's chat template")
    probe = [{"role": "user", "content": f"A{image_token}B"}]
    for candidate in (template, _STRING_TO_PARTS_PREAMBLE + template):
        try:
            text = clock.render(tokenizer, probe, candidate)
        except TemplateTimeout:
            raise
        except Exception:  # a template that cannot render strings raises inside jinja
            continue
        if f"A{image_token}B" in text:
            return candidate
    raise ExportError(f"{clock.source}: the chat template renders neither plain-string nor content-list messages with text intact")


def _read_json(path: Path, required: bool = False) -> dict:
    """A JSON object file of a model folder ({} when absent, unless `required`). Whatever is wrong
    with it (not UTF-8, not JSON, nested past Python's recursion limit, not an object) is an
    ExportError naming the file."""
    if not path.is_file():
        if required:
            raise ExportError(f"{path} is missing")
        return {}
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ExportError(f"{path} is not UTF-8 text (byte {e.start}): not a JSON file") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON ({e})") from None
    except RecursionError:
        raise ExportError(f"{path} nests too deeply to be a model's JSON file") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path} must hold a JSON object, not a {type(value).__name__}")
    if path.name in _PROCESSOR_FILES:
        _check_processor_fields(path, value)
    return value


# Processor files and the types of the fields importers read from them (types checked where
# read, so a hand-edited or hostile file fails naming its field, not with a TypeError later).
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
_INT_FIELDS = {"merge_size", "temporal_patch_size", "min_pixels", "max_pixels", "min_patches", "max_patches", "image_seq_length",
               "image_seq_len", "resample", "max_image_tiles", "num_frames", "min_frames", "max_frames", "spatial_merge_size",
               "num_query_tokens", "longest_edge", "shortest_edge", "height", "width"}
_SIZE_FIELDS = {"size", "crop_size", "max_image_size", "video_size", "patch_size"}  # an int or {edge name: int}
_NUMBER_FIELDS = {"fps", "padding_value"}
_NUMBERS_FIELDS = {"image_mean", "image_std"}  # a number or a list of numbers
_BOOL_FIELDS = {"do_image_splitting", "do_pad", "do_center_crop", "crop_to_patches", "use_thumbnail", "do_sample_frames",
                "do_pan_and_scan"}
_STR_FIELDS = {"image_token", "video_token", "padding_mode"}
_OBJECT_FIELDS = {"image_processor", "video_processor", "video_sampling"}
# No real processor comes near this many pixels (16384 x 16384) or pixels per edge; larger values
# would have vlmkit allocate terabytes for one image.
MAX_PROCESSOR_INT = 1 << 28


def _check_processor_fields(path: Path, settings: dict, where: str = "") -> None:
    import math

    def bad(key, value, what):
        shown = json.dumps(value)
        raise ExportError(f"{path}: {where}{key} must be {what}, not {shown[:80]}{'...' if len(shown) > 80 else ''}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def check_int(key, value):
        if not is_int(value) or not 0 <= value <= MAX_PROCESSOR_INT:
            bad(key, value, f"an integer from 0 to {MAX_PROCESSOR_INT}")

    for key, value in settings.items():
        if value is None:
            continue
        if key in _INT_FIELDS:
            check_int(key, value)
        elif key in _SIZE_FIELDS:
            if isinstance(value, dict):
                for edge, n in value.items():
                    if n is not None:
                        check_int(f"{key}.{edge}", n)
            else:
                check_int(key, value)
        elif key in _NUMBER_FIELDS and not is_number(value):
            bad(key, value, "a finite number")
        elif key in _NUMBERS_FIELDS and not (is_number(value) or (isinstance(value, list) and value and all(map(is_number, value)))):
            bad(key, value, "a number or a list of numbers")
        elif key in _BOOL_FIELDS and not isinstance(value, bool):
            bad(key, value, "true or false")
        elif key in _STR_FIELDS and not (isinstance(value, str) and value):
            bad(key, value, "a non-empty string")
        elif key == "image_grid_pinpoints" and not (isinstance(value, list) and all(
                isinstance(p, list) and len(p) == 2 and all(is_int(x) and 0 < x <= MAX_PROCESSOR_INT for x in p) for p in value)):
            bad(key, value, "a list of [height, width] pairs")
        elif key in _OBJECT_FIELDS:
            if not isinstance(value, dict):
                bad(key, value, "an object")
            _check_processor_fields(path, value, f"{where}{key}.")

