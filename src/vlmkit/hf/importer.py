"""Hugging Face folders of the seed's families -> vlmkit checkpoints, and back.

`import_hf(folder, out)` reads `config.json` (never running remote code), picks the family by
`model_type`, maps the weights onto vlmkit's parts and writes a normal vlmkit checkpoint:

* the LLM as a folder inside the checkpoint (`llm/`: config, safetensors, tokenizer with the
  folder's chat template), loaded as a pretrained part, so checkpoints written while training
  a frozen or LoRA-adapted LLM do not repeat it;
* the vision tower and connector (and LLaVA-NeXT's `image_newline`) as checkpoint weights;
* preprocessing as vlmkit's own family with the folder's settings (`preprocessor_config.json`
  or the processor's nested `image_processor`), so no transformers processor, and with it no
  torchvision, is needed at run time.

Families:
* `qwen2_vl`: the `qwen2-vit` tower, the PatchMerger as a pre-norm 2x2 `pixel-shuffle`
  connector, the M-RoPE decoder (`qwen2-vl-text`), the `qwen2vl` processor (smart_resize with
  the folder's min/max pixels, patch, merge, mean/std).
* `qwen2_5_vl`: the same with the `qwen2.5-vit` tower (windowed attention, RMSNorm, SwiGLU) and
  an RMSNorm before the merge (`norm_kind: rmsnorm`).
* `llava_next`: a SigLIP / CLIP tower (`hf-random` + the folder's weights), the 2-layer GELU
  projector (`mlp`) plus `image_newline`, any transformers causal LM, the `anyres` processor
  with the folder's pinpoints.
* `idefics3` (Idefics3, SmolVLM v1): its vision transformer as a SigLIP tower (`hf-random` +
  weights), pixel shuffle + one bias-free linear (`pixel-shuffle`, `norm: none`), any causal LM,
  the `idefics3` processor (crop size, longest edge, splitting, mean/std).
* `llava`: LLaVA-1.5 (`llava.import_llava`).

Imported models never write vlmkit's `<image_k>` sentinels before the images of a multi-image
prompt (`processor.options.sentinels: never`): the released checkpoints were not trained with
them, and the prompt must be the one their own processor builds.

Weights are read from safetensors files only (`model.safetensors` or the index's shards); a
folder with only pickled `.bin` weights is refused, a missing shard or a truncated file is named,
and a tensor whose shape disagrees with the config is named with both shapes.

`export_hf(model, out)` writes the family's own transformers format (config, weights,
processor files, chat template); importing that folder again gives the same tensors.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vlmkit.config import load_config
from vlmkit.hf.llava import (_STRING_TO_PARTS_PREAMBLE, ExportError, _chat_template, _hf_config_dict, _plain_of_image_parts,
                              _read_json, _template_source, _usable_template, export_llava, import_llava)
from vlmkit.hf.output_folder import claim_output, publish, staging_folder
from vlmkit.paths import offline
from vlmkit.utils import respect_umask

IMPORT_COMMAND, EXPORT_COMMAND = "import-hf", "export-hf"


@dataclass(frozen=True)
class HFFamily:
    """One transformers family vlmkit imports and exports.

    `owns(model)` tells whether a vlmkit model exports to this family (asked in registration
    order, most specific first); `reference(model, prompt, ids)` returns the transformers class
    and the keyword inputs (besides `input_ids`) that feed it the prompt's images, for
    `verify_hf_export`."""

    model_types: tuple[str, ...]
    description: str
    importer: Callable[[Path, Path], Path]
    exporter: Callable[[Any, Path], Path]
    owns: Callable[[Any], bool]
    reference: Callable[[Any, Any, torch.Tensor], tuple[type, dict]] | None = None
    accepts: Callable[[dict], bool] = lambda cfg: True


FAMILIES: list[HFFamily] = []

# Modules under `vlmkit.hf.families` that register more families when imported.
FAMILY_MODULES: tuple[str, ...] = ("pixtral", "mllama", "paligemma", "gemma3", "smolvlm", "llava_onevision", "idefics2",
                                   "blip2", "fuyu")


def register_family(family: HFFamily) -> HFFamily:
    FAMILIES.insert(0, family)  # later registrations are more specific: asked first by family_of
    return family


def _families() -> list[HFFamily]:
    import importlib

    for name in FAMILY_MODULES:
        importlib.import_module(f"vlmkit.hf.families.{name}")
    return FAMILIES


def family_for(model_type: str, cfg: dict | None = None) -> HFFamily | None:
    return next((f for f in _families() if model_type in f.model_types and (cfg is None or f.accepts(cfg))), None)


class _Supported(dict):
    """model_type -> description of every registered family (filled on first use, so family
    modules can import this one)."""

    def _fill(self):
        for f in reversed(_families()):
            for t in f.model_types:
                dict.setdefault(self, t, f.description)

    def __contains__(self, key):
        self._fill()
        return dict.__contains__(self, key)

    def items(self):
        self._fill()
        return dict.items(self)

    def __iter__(self):
        self._fill()
        return dict.__iter__(self)


SUPPORTED = _Supported()


def supported_families() -> str:
    return ", ".join(f"{k} [{v}]" for k, v in SUPPORTED.items())


def read_hf_config(folder: Path) -> dict:
    """`config.json` as JSON, refused before anything is built when it names remote code or an
    unsupported family."""
    path = folder / "config.json"
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder")
    if not path.is_file():
        raise ExportError(f"{folder} has no config.json: not a Hugging Face model folder")
    cfg = _read_json(path)
    if "auto_map" in cfg:
        # auto_map points at Python files in the folder that transformers would import and run.
        raise ExportError(f"{path} has an auto_map: the model needs trust_remote_code (its own Python code), "
                          "which vlmkit never runs. Supported families: " + supported_families())
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in SUPPORTED:
        raise ExportError(f"{path}: model_type {model_type!r} (architectures {cfg.get('architectures')}) is not supported; "
                          "vlmkit imports: " + supported_families())
    return cfg


def auto_config(folder: Path):
    """transformers' config object for the folder (read_hf_config has vetted the file); a field of
    the wrong type is an ExportError naming config.json, not transformers' own exception."""
    from transformers import AutoConfig

    read_hf_config(folder)
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises TypeError, ValueError, AttributeError, KeyError ... for odd fields
        raise ExportError(f"{folder / 'config.json'}: transformers cannot build the config ({type(e).__name__}: {e})") from None


# The JSON files a tokenizer folder may hold; each is checked (readable, an object) before
# transformers parses it, so a broken one is named.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def load_tokenizer(folder: Path):
    """The folder's tokenizer; a broken tokenizer file is an ExportError naming it."""
    from transformers import AutoTokenizer

    for name in _TOKENIZER_FILES:
        _read_json(folder / name)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers / tokenizers raise several types for a missing or broken tokenizer
        present = [n for n in _TOKENIZER_FILES if (folder / n).is_file()]
        raise ExportError(f"{folder}: the tokenizer does not load from {present or 'its files'} ({type(e).__name__}: {e})") from None


def check_in_vocab(tokenizer, token: str, source: str) -> None:
    """An image / video token the tokenizer does not know would become the unknown token (or an
    error deep in the model build): refuse it naming where it came from."""
    if not isinstance(token, str) or token not in tokenizer.get_vocab():
        raise ExportError(f"{source}: the image token {token!r} is not in the tokenizer's vocabulary")


def _weight_files(folder: Path) -> tuple[Path | None, dict | None, list[str]]:
    """(index file or None, its weight_map or None, the weight files), each file checked to stay
    inside the folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()):
            raise ExportError(f"{index}: weight_map must be an object of tensor name -> file name, not {json.dumps(weight_map)[:80]}")
        for key, name in weight_map.items():
            _inside(folder, name, f"{index}: weight_map entry {key!r} -> {name!r}")
        return index, weight_map, sorted(set(weight_map.values()))
    if (folder / "model.safetensors").is_file():
        _inside(folder, "model.safetensors", f"{folder / 'model.safetensors'}")
        return None, None, ["model.safetensors"]
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = f" (it has {pickled}: pickled weights, which vlmkit never loads; convert them to safetensors)" if pickled else ""
    raise ExportError(f"{folder} has no model.safetensors or model.safetensors.index.json{hint}")


def _inside(folder: Path, name: str, what: str) -> Path:
    """`folder / name`, refused where it leads outside the folder: an absolute path, `..`, or a
    symlink whose target lies elsewhere. A Hugging Face cache snapshot's files are links into the
    same repository's `blobs/`, which is accepted."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ExportError(f"{what}: points outside {folder}; weight files must be inside the model folder")
    root = folder.resolve()
    roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    real = (folder / name).resolve()
    if not any(real.is_relative_to(r) for r in roots):
        raise ExportError(f"{what}: resolves to {real}, outside {folder}; weight files must be inside the model folder")
    return folder / name


# Integer tensors a float model may carry (index buffers); any other integer or bool tensor sits
# where a float weight belongs.
_INTEGER_BUFFERS = ("position_ids", "num_batches_tracked")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors weights (single file or sharded index), after
    `check_weight_files`; weights holding NaN or infinities are imported with a warning naming
    them."""
    from safetensors import SafetensorError, safe_open

    files = check_weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        try:
            with safe_open(str(path), framework="pt") as f:
                loaded = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ExportError(f"weight file {path} cannot be read, truncated or corrupt? ({e})") from None
        warn_non_finite(path, loaded)
        state |= loaded
    return state


def check_weight_files(folder: Path) -> list[str]:
    """The folder's safetensors files, checked from their headers before any tensor is read:
    every file inside the folder, float dtypes for weights, every indexed tensor present, and
    enough weights for what config.json describes (a config claiming a far larger model than
    the files hold is refused before anything that size is built)."""
    from safetensors import SafetensorError, safe_open

    index, weight_map, files = _weight_files(folder)
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise ExportError(f"weight file {path} is missing (listed in {index.name})")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    dtype = piece.get_dtype()
                    if not dtype.startswith(("F", "BF")) and not key.endswith(_INTEGER_BUFFERS):
                        raise ExportError(f"{path}: tensor {key} is stored as {dtype}; model weights are floating point "
                                          "(a corrupt, mislabelled or quantised file)")
                    shapes[key] = tuple(piece.get_shape())
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ExportError(f"weight file {path} cannot be read, truncated or corrupt? ({e})") from None
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(shapes))
        if absent:
            raise ExportError(f"{index}: {len(absent)} tensors listed but absent from their files, e.g. {absent[:3]}")
    check_config_fits_weights(folder, shapes)
    return files


def warn_non_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A warning naming the tensors (of the file or folder `path`) holding NaN or infinities: a
    model trained into NaN still imports, but should not pass unnoticed."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        import warnings

        warnings.warn(f"{path}: {len(bad)} tensors hold NaN or infinite values, e.g. {bad[:3]}; the imported model will "
                      "compute NaN", stacklevel=3)


_LAYER_FIELDS = ("num_hidden_layers", "depth", "num_layers", "n_layer")
_WIDTH_FIELDS = ("hidden_size", "embed_dim", "d_model", "n_embd")


def check_config_fits_weights(folder: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a config.json that describes far more parameters than the weight files hold, before
    a model that size is built (a 300 KB folder claiming hidden_size 8192 or a million layers would
    otherwise allocate gigabytes or run for minutes before the shapes are compared).

    For each (sub)config giving a depth and a width, every layer holds at least a quarter of a
    width x width attention matrix and one width x intermediate_size MLP matrix, so depth x
    width x (width / 4 + intermediate_size) is a floor no real model goes below; the exact shapes
    are still compared tensor by tensor later."""
    import math

    total = sum(math.prod(s) for s in shapes.values())
    path = folder / "config.json"

    def visit(cfg: dict, where: str) -> None:
        ints = {k: v for k, v in cfg.items() if isinstance(v, int) and not isinstance(v, bool)}
        layer_field = next((f for f in _LAYER_FIELDS if f in ints), None)
        widths = {f: ints[f] for f in _WIDTH_FIELDS if f in ints}
        if layer_field and widths:
            width_field = min(widths, key=widths.get)
            layers, width, inner = ints[layer_field], widths[width_field], max(ints.get("intermediate_size", 0), 0)
            floor = max(layers, 0) * max(width, 0) * (max(width, 0) // 4 + inner)
            if floor > total:
                named = f"{where}{layer_field}={layers}, {where}{width_field}={width}" + (
                    f", {where}intermediate_size={inner}" if inner else "")
                raise ExportError(f"{path}: {named} describe at least {floor:,} parameters, but the weight files hold "
                                  f"{total:,}: the config does not match the weights")
        for key, value in cfg.items():
            if isinstance(value, dict):
                visit(value, f"{where}{key}.")

    visit(_read_json(path), "")


def split_state(state: dict[str, torch.Tensor], prefixes: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """Group tensors by the first matching source prefix -> {part: {key without prefix}}. Tries
    longer prefixes first, so `model.visual.` wins over `model.`."""
    out: dict[str, dict[str, torch.Tensor]] = {part: {} for part in set(prefixes.values())}
    ordered = sorted(prefixes, key=len, reverse=True)
    unknown = []
    for key, value in state.items():
        for prefix in ordered:
            if key.startswith(prefix):
                out[prefixes[prefix]][key[len(prefix):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ExportError(f"tensors that belong to no part of the model: {unknown[:5]}")
    return out


def load_part(module: nn.Module, state: dict[str, torch.Tensor], what: str, source_prefix: str = "",
              optional: tuple[str, ...] = ("position_ids", "rotary", "inv_freq")) -> None:
    """Copy `state` into `module`; every missing, unexpected or mis-shaped tensor is an error
    naming it as the folder names it."""
    check_part(module, state, what, source_prefix, optional)
    target = module.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if key in target:
                target[key].copy_(value.to(target[key].dtype))


def check_part(module: nn.Module, state: dict[str, torch.Tensor], what: str, source_prefix: str = "",
               optional: tuple[str, ...] = ("position_ids", "rotary", "inv_freq")) -> None:
    """`load_part`'s checks without the copy: works on a module built on the meta device, so a
    config is compared with the weights before a model its size is allocated."""
    target = module.state_dict()
    missing = [k for k in target if k not in state and not any(o in k for o in optional)]
    unexpected = [k for k in state if k not in target and not any(o in k for o in optional)]
    if missing:
        raise ExportError(f"{what}: the folder lacks tensors the config needs: {[source_prefix + k for k in missing[:5]]}")
    if unexpected:
        raise ExportError(f"{what}: tensors the config has no place for: {[source_prefix + k for k in unexpected[:5]]}")
    for key, value in state.items():
        if key in target and tuple(target[key].shape) != tuple(value.shape):
            raise ExportError(f"{what}: tensor {source_prefix + key} has shape {tuple(value.shape)}, "
                              f"but config.json implies {tuple(target[key].shape)}")
        if key in target and target[key].is_floating_point() and not value.is_floating_point():
            raise ExportError(f"{what}: tensor {source_prefix + key} is {value.dtype}, where a floating-point weight belongs")


def _image_processor_settings(folder: Path) -> dict:
    # transformers 5 nests the image processor inside processor_config.json; older folders keep
    # it in preprocessor_config.json.
    return _read_json(folder / "processor_config.json").get("image_processor") or _read_json(folder / "preprocessor_config.json")


def _resample(settings: dict) -> str:
    return {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(settings.get("resample", 3), "bicubic")


def _tokenizer(folder: Path, image_token: str):
    tokenizer = load_tokenizer(folder)
    check_in_vocab(tokenizer, image_token, f"{folder} (processor_config.json / config.json)")
    template = _usable_template(_chat_template(folder, tokenizer), tokenizer, image_token, _template_source(folder))
    if template:
        tokenizer.chat_template = template
    return tokenizer


def max_positions(text_cfg, default: int, cap: int | None = None) -> int:
    """The LLM's context length from its config (`default` where it gives none), for
    `train.max_length`; `cap` bounds configs that claim more than a recipe should default to."""
    n = int(getattr(text_cfg, "max_position_embeddings", default) or default)
    return min(n, cap) if cap else n


def stage_llm(tmp: Path, causal, tokenizer) -> Path:
    """Write the converted LLM and its tokenizer into the staging folder; returns their folder."""
    staged = tmp / "llm"
    causal.save_pretrained(staged, safe_serialization=True)
    tokenizer.save_pretrained(staged)
    return staged


def build_imported(config, image_token: str | None = None, expected_id: int | None = None):
    """The vlmkit model an imported recipe describes, vision tower and connector left trainable so
    `load_part` can fill and check them. The image token's id is checked against the one
    config.json gives: a tokenizer that maps it elsewhere would put image features on the wrong
    positions."""
    from vlmkit.model.vlm import VisionLanguageModel

    model = VisionLanguageModel.build(config.model)
    if expected_id is not None and model.image_token_id != expected_id:
        raise ExportError(f"the tokenizer maps {image_token!r} to {model.image_token_id}, config.json says {expected_id}")
    model.set_trainable(["vision", "connector"])
    return model


def _write_checkpoint(model, config, folder: Path, out: Path, staged_llm: Path, tmp: Path, max_length: int) -> Path:
    """Save the imported model under `out` (built in the staging folder `tmp`, then swapped in; see
    `vlmkit.hf.output_folder`), its LLM folder beside it, and the recipe pointing at that folder with
    `max_length` as `train.max_length`."""
    from vlmkit.checkpoint import save_checkpoint

    config.model.llm.path = str(out / "llm")
    config.train.max_length = max_length
    ckpt = save_checkpoint(tmp / "ckpt", model, config, meta={"imported_from": str(folder.resolve())})
    shutil.move(str(staged_llm), ckpt / "llm")
    respect_umask(ckpt)
    return publish(ckpt, out, command=IMPORT_COMMAND, source=folder.resolve())


# ---- import ----------------------------------------------------------------------------------


def import_hf(folder: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Any supported Hugging Face folder -> a vlmkit checkpoint at `out`. An existing `out` is
    replaced only when it is empty or an earlier import, or when `overwrite` is set; never when it
    is or contains `folder` (`vlmkit.hf.output_folder`)."""
    offline()
    folder = Path(folder)
    out = claim_output(out, command=IMPORT_COMMAND, sources=(folder,), overwrite=overwrite)
    cfg = read_hf_config(folder)
    return family_for(cfg["model_type"], cfg).importer(folder, out)


def _staging(out: Path) -> Path:
    return staging_folder(out)


def import_qwen2_vl(folder: Path, out: Path) -> Path:
    from vlmkit.model.qwen2vl import MRopeCausalLM, save_mrope_llm

    folder, out = Path(folder), Path(out).resolve()
    qwen25 = read_hf_config(folder)["model_type"] == "qwen2_5_vl"
    cfg = auto_config(folder)
    state = read_weights(folder)
    # transformers 5 saves Qwen2-VL in the original layout (visual.*, model.*, lm_head.*); the
    # in-memory layout (model.visual.*, model.language_model.*) is accepted too.
    parts = split_state(state, {"visual.": "vision", "model.visual.": "vision", "model.language_model.": "llm",
                                "model.": "llm", "lm_head.": "head"})
    vision_cfg, text_cfg = cfg.vision_config, cfg.text_config
    merge = vision_cfg.spatial_merge_size
    vision_state = {k: v for k, v in parts["vision"].items() if not k.startswith("merger.")}
    merger = {k[len("merger."):]: v for k, v in parts["vision"].items() if k.startswith("merger.")}
    connector_state = {"norm.weight": merger.get("ln_q.weight"), "norm.bias": merger.get("ln_q.bias"),
                       "proj.0.weight": merger.get("mlp.0.weight"), "proj.0.bias": merger.get("mlp.0.bias"),
                       "proj.2.weight": merger.get("mlp.2.weight"), "proj.2.bias": merger.get("mlp.2.bias")}
    if qwen25:  # Qwen2.5-VL's merger norm is an RMSNorm: no bias
        del connector_state["norm.bias"]
    # Qwen2-VL's tower width is embed_dim (hidden_size is the merger's output); Qwen2.5-VL's is hidden_size.
    width = vision_cfg.hidden_size if qwen25 else vision_cfg.embed_dim
    if any(v is None for v in connector_state.values()):
        raise ExportError(f"{folder}: the vision merger's weights (visual.merger.ln_q / mlp.0 / mlp.2) are incomplete")
    llm_state = {f"model.{k}": v for k, v in parts["llm"].items()} | {f"lm_head.{k}": v for k, v in parts["head"].items()}

    settings = _image_processor_settings(folder)
    patch = settings.get("patch_size", vision_cfg.patch_size)
    proc_merge = settings.get("merge_size", merge)
    size = settings.get("size") or {}
    min_pixels = settings.get("min_pixels") or size.get("shortest_edge") or 56 * 56
    max_pixels = settings.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280
    if patch != vision_cfg.patch_size or proc_merge != merge:
        raise ExportError(f"{folder}: the image processor's patch/merge ({patch}, {proc_merge}) differ from the vision "
                          f"config's ({vision_cfg.patch_size}, {merge})")
    processor_cfg = _read_json(folder / "processor_config.json")
    probe = load_tokenizer(folder)
    image_token = processor_cfg.get("image_token") or probe.convert_ids_to_tokens(cfg.image_token_id)
    tokenizer = _tokenizer(folder, image_token)
    video_token, video_options = _qwen2_vl_video(folder, cfg, probe, processor_cfg)

    tmp = _staging(out)
    try:
        staged_llm = tmp / "llm"
        # Qwen2-VL keeps tie_word_embeddings on the outer config; the decoder folder carries it.
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        text_cfg.tie_word_embeddings = tied
        if tied:  # as transformers does: a tied head is the embedding, whatever the file holds
            llm_state.pop("lm_head.weight", None)
        optional = ("rotary", "inv_freq") + (("lm_head.weight",) if tied else ())
        with torch.device("meta"):  # shapes first: a config larger than its weights allocates nothing
            check_part(MRopeCausalLM(text_cfg), llm_state, "language model", optional=optional)
        llm = MRopeCausalLM(text_cfg)
        load_part(llm, llm_state, "language model", optional=optional)
        save_mrope_llm(llm, tokenizer, staged_llm)
        del llm
        vision_dict = _hf_config_dict(vision_cfg)
        config = load_config({"model": {
            "vision": {"name": "qwen2.5-vit" if qwen25 else "qwen2-vit", "config": vision_dict},
            "connector": {"name": "pixel-shuffle", "options": {"ratio": 1 / merge, "norm": "pre", "norm_eps": 1e-6,
                                                               "norm_kind": "rmsnorm" if qwen25 else "layernorm",
                                                               "hidden_size": width * merge**2}},
            "llm": {"name": "qwen2-vl-text", "path": str(staged_llm)},
            "processor": {"name": "qwen2vl", "image_size": patch * merge * 8,
                          "mean": list(settings.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
                          "std": list(settings.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
                          "resample": _resample(settings),
                          "options": {"patch_size": patch, "merge_size": merge,
                                      "temporal_patch_size": settings.get("temporal_patch_size", vision_cfg.temporal_patch_size),
                                      "min_pixels": int(min_pixels), "max_pixels": int(max_pixels),
                                      "sentinels": "never", **video_options}},
            "image_token": image_token,
            "video_token": video_token,
        }})
        model = build_imported(config, image_token, cfg.image_token_id)
        load_part(model.vision.model, vision_state, "vision tower", "visual.")
        load_part(model.connector, connector_state, "vision merger", "visual.merger(mapped) ")
        return _write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(text_cfg, 4096))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _qwen2_vl_video(folder: Path, cfg, tokenizer, processor_cfg: dict) -> tuple[str | None, dict]:
    """Qwen2-VL's video side: its own slot token (<|video_pad|>) and the video processor's
    settings (`video_preprocessor_config.json`): frames in temporal patches, the frames'
    smart_resize bounds, and frame sampling when the folder turns it on."""
    video_id = getattr(cfg, "video_token_id", None)
    token = processor_cfg.get("video_token") or (tokenizer.convert_ids_to_tokens(video_id) if video_id is not None else None)
    if not token or token not in tokenizer.get_vocab():
        return None, {}
    settings = _read_json(folder / "video_preprocessor_config.json") or processor_cfg.get("video_processor") or {}
    options: dict = {"video": {"compression": "temporal-patch"}}
    size = settings.get("size") or {}
    low, high = settings.get("min_pixels") or size.get("shortest_edge"), settings.get("max_pixels") or size.get("longest_edge")
    if low:
        options["video_min_pixels"] = int(low)
    if high:
        options["video_max_pixels"] = int(high)
    if settings.get("do_sample_frames"):
        if settings.get("num_frames"):
            options["video"] |= {"sampling": "uniform", "num_frames": int(settings["num_frames"])}
        else:
            options["video"] |= {"sampling": "fps", "fps": float(settings.get("fps") or 2.0),
                                 "min_frames": int(settings.get("min_frames") or 4), "max_frames": int(settings.get("max_frames") or 768)}
    return token, options


def _causal_lm_from_state(text_cfg, state: dict[str, torch.Tensor], outer=None):
    """The folder's LLM as a standalone causal LM. Some families keep `tie_word_embeddings` on
    the outer config (`outer`); the standalone LM's config carries it."""
    from transformers import AutoModelForCausalLM

    tied = bool(getattr(text_cfg, "tie_word_embeddings", False) or getattr(outer, "tie_word_embeddings", False))
    text_cfg.tie_word_embeddings = tied
    if tied:  # as transformers does: a tied head is the embedding, whatever the file holds
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    optional = ("rotary", "inv_freq") + (("lm_head.weight",) if tied else ())
    with torch.device("meta"):  # shapes first: a config larger than its weights allocates nothing
        check_part(AutoModelForCausalLM.from_config(text_cfg), state, "language model", optional=optional)
    causal = AutoModelForCausalLM.from_config(text_cfg).eval()
    load_part(causal, state, "language model", optional=optional)
    if tied:
        causal.tie_weights()
    return causal


def import_llava_next(folder: Path, out: Path, processor: str = "anyres", processor_options: dict | None = None) -> Path:
    """LLaVA-NeXT; with `processor="anyres-max"` and its options, LLaVA-OneVision (same weights
    and layout, capped feature maps, base-view images in multi-image prompts)."""
    folder, out = Path(folder), Path(out).resolve()
    read_hf_config(folder)
    cfg = auto_config(folder)
    vision_cfg, text_cfg = cfg.vision_config, cfg.text_config
    if vision_cfg.model_type not in ("siglip_vision_model", "clip_vision_model"):
        raise ExportError(f"vision tower {vision_cfg.model_type!r}: import supports SigLIP and CLIP towers")
    if not isinstance(cfg.vision_feature_layer, int):
        raise ExportError(f"vision_feature_layer={cfg.vision_feature_layer}: concatenating several layers has no vlmkit equivalent")
    has_cls = vision_cfg.model_type.startswith("clip")
    if (cfg.vision_feature_select_strategy == "default") != has_cls:
        raise ExportError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} with a {vision_cfg.model_type} "
                          "tower: vlmkit drops the CLS token exactly when the tower has one")
    if cfg.projector_hidden_act != "gelu":
        raise ExportError(f"projector activation {cfg.projector_hidden_act!r}: vlmkit's MLP connector uses exact GELU")
    feature_layer = cfg.vision_feature_layer
    if feature_layer == -1 and not getattr(vision_cfg, "tie_last_hidden_states", False):
        # LLaVA reads hidden_states[-1] (before any final norm); vlmkit's -1 is the tower's output.
        feature_layer = vision_cfg.num_hidden_layers

    state = read_weights(folder)
    parts = split_state(state, {
        "vision_tower.": "vision", "model.vision_tower.": "vision",
        "multi_modal_projector.": "projector", "model.multi_modal_projector.": "projector",
        "image_newline": "newline", "model.image_newline": "newline",
        "language_model.model.": "llm", "model.language_model.": "llm",
        "language_model.lm_head.": "head", "lm_head.": "head"})
    if "" not in parts["newline"]:
        raise ExportError(f"{folder}: image_newline is missing")
    p = parts["projector"]
    if "linear_1.weight" not in p or "linear_2.weight" not in p:
        raise ExportError(f"{folder}: multi_modal_projector.linear_1 / linear_2 weights are missing")
    zeros = lambda w: torch.zeros(w.shape[0])  # noqa: E731  (a bias-free projector is bias = 0)
    connector_state = {"fc1.weight": p["linear_1.weight"], "fc1.bias": p.get("linear_1.bias", zeros(p["linear_1.weight"])),
                       "fc2.weight": p["linear_2.weight"], "fc2.bias": p.get("linear_2.bias", zeros(p["linear_2.weight"])),
                       "image_newline": parts["newline"][""]}
    llm_state = {f"model.{k}": v for k, v in parts["llm"].items()} | {f"lm_head.{k}": v for k, v in parts["head"].items()}

    settings = _image_processor_settings(folder)
    crop = settings.get("crop_size") or {}
    tile = crop.get("height") or (settings.get("size") or {}).get("shortest_edge") or vision_cfg.image_size
    if tile != vision_cfg.image_size:
        raise ExportError(f"{folder}: the image processor's tile size {tile} differs from the vision tower's image_size {vision_cfg.image_size}")
    pinpoints = settings.get("image_grid_pinpoints") or cfg.image_grid_pinpoints
    processor_cfg = _read_json(folder / "processor_config.json")
    image_token = processor_cfg.get("image_token", "<image>")
    tokenizer = _tokenizer(folder, image_token)

    tmp = _staging(out)
    try:
        staged_llm = stage_llm(tmp, _causal_lm_from_state(text_cfg, llm_state, cfg), tokenizer)
        config = load_config({"model": {
            "vision": {"name": "hf-random", "model_type": vision_cfg.model_type, "config": _hf_config_dict(vision_cfg),
                       "feature_layer": feature_layer},
            "connector": {"name": "mlp", "options": {"hidden_size": p["linear_1.weight"].shape[0]}},
            "llm": {"name": "hf", "path": str(staged_llm)},
            "processor": {"name": processor, "image_size": tile, "mean": list(settings.get("image_mean", (0.5,) * 3)),
                          "std": list(settings.get("image_std", (0.5,) * 3)), "resample": _resample(settings),
                          "options": {"patch_size": vision_cfg.patch_size, "grid_pinpoints": [list(x) for x in pinpoints],
                                      "sentinels": "never", **(processor_options or {})}},
            "image_token": image_token,
        }})
        model = build_imported(config, image_token, cfg.image_token_index)
        load_part(model.vision.model, parts["vision"], "vision tower", "vision_tower.")
        load_part(model.connector, connector_state, "projector", "multi_modal_projector(mapped) ")
        return _write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(text_cfg, 2048))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def import_idefics3(folder: Path, out: Path, tower: str = "siglip_vision_model", processor: str = "idefics3",
                    processor_options: dict | None = None) -> Path:
    """Idefics3 / SmolVLM: its vision transformer is SigLIP's (same weights and, for the
    full-size crops its processor makes, the same position ids), its connector a pixel shuffle
    plus one bias-free linear layer, its LLM a Llama. `tower`: the transformers vision model the
    weights load into (SmolVLM2 keeps its own, `smolvlm_vision`); `processor` and
    `processor_options`: SmolVLM2's processor family (video) and its settings."""
    folder, out = Path(folder), Path(out).resolve()
    read_hf_config(folder)
    cfg = auto_config(folder)
    vision_cfg, text_cfg = cfg.vision_config, cfg.text_config
    state = read_weights(folder)
    parts = split_state(state, {"model.vision_model.": "vision", "vision_model.": "vision",
                                "model.connector.": "connector", "connector.": "connector",
                                "model.text_model.": "llm", "text_model.": "llm", "lm_head.": "head"})
    proj = parts["connector"].get("modality_projection.proj.weight")
    if proj is None:
        raise ExportError(f"{folder}: connector.modality_projection.proj.weight is missing")
    llm_state = {f"model.{k}": v for k, v in parts["llm"].items()} | {f"lm_head.{k}": v for k, v in parts["head"].items()}
    settings = _image_processor_settings(folder)
    crop = (settings.get("max_image_size") or {}).get("longest_edge") or vision_cfg.image_size
    if crop != vision_cfg.image_size:
        raise ExportError(f"{folder}: the image processor's crop size {crop} differs from the vision tower's image_size {vision_cfg.image_size}")
    longest = (settings.get("size") or {}).get("longest_edge") or 4 * crop
    resample = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(settings.get("resample", 1), "lanczos")
    image_token = "<image>"
    tokenizer = _tokenizer(folder, image_token)
    siglip = _hf_config_dict(vision_cfg) | ({"vision_use_head": False} if tower == "siglip_vision_model" else {})

    tmp = _staging(out)
    try:
        staged_llm = stage_llm(tmp, _causal_lm_from_state(text_cfg, llm_state, cfg), tokenizer)
        config = load_config({"model": {
            "vision": {"name": "hf-random", "model_type": tower, "config": siglip},
            "connector": {"name": "pixel-shuffle", "options": {"ratio": 1 / cfg.scale_factor, "norm": "none",
                                                               "projector": "linear", "bias": False}},
            "llm": {"name": "hf", "path": str(staged_llm)},
            "processor": {"name": processor, "image_size": crop, "mean": list(settings.get("image_mean", (0.5,) * 3)),
                          "std": list(settings.get("image_std", (0.5,) * 3)),
                          "options": {"patch_size": vision_cfg.patch_size, "scale_factor": cfg.scale_factor, "longest_edge": longest,
                                      "do_image_splitting": bool(settings.get("do_image_splitting", True)), "resample": resample,
                                      "sentinels": "never", **(processor_options or {})}},
            "image_token": image_token,
        }})
        model = build_imported(config, image_token, cfg.image_token_id)
        load_part(model.vision.model, parts["vision"], "vision tower", "model.vision_model.")
        load_part(model.connector, {"proj.weight": proj}, "connector", "model.connector.modality_projection(mapped) ")
        return _write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(text_cfg, 2048))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def import_internvl(folder: Path, out: Path) -> Path:
    """InternVL (transformers' port): its ViT (`hf-random`, internvl_vision, CLS dropped), pixel
    shuffle with a LayerNorm after the merge and a 2-layer GELU MLP (`pixel-shuffle`, `norm:
    post`), any causal LM, the `dynamic` tiling processor (min/max patches, thumbnail)."""
    folder, out = Path(folder), Path(out).resolve()
    read_hf_config(folder)
    cfg = auto_config(folder)
    vision_cfg, text_cfg = cfg.vision_config, cfg.text_config
    if cfg.vision_feature_select_strategy != "default":
        raise ExportError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}: vlmkit drops InternVL's CLS token ('default')")
    if not isinstance(cfg.vision_feature_layer, int):
        raise ExportError(f"vision_feature_layer={cfg.vision_feature_layer}: concatenating several layers has no vlmkit equivalent")
    if cfg.projector_hidden_act != "gelu":
        raise ExportError(f"projector activation {cfg.projector_hidden_act!r}: vlmkit's MLP projector uses exact GELU")
    state = read_weights(folder)
    parts = split_state(state, {"model.vision_tower.": "vision", "vision_tower.": "vision",
                                "model.multi_modal_projector.": "projector", "multi_modal_projector.": "projector",
                                "model.language_model.": "llm", "language_model.model.": "llm",
                                "language_model.lm_head.": "head", "lm_head.": "head"})
    p = parts["projector"]
    names = {"norm.weight": "layer_norm.weight", "norm.bias": "layer_norm.bias", "proj.0.weight": "linear_1.weight",
             "proj.0.bias": "linear_1.bias", "proj.2.weight": "linear_2.weight", "proj.2.bias": "linear_2.bias"}
    absent = [v for v in names.values() if v not in p]
    if absent:
        raise ExportError(f"{folder}: multi_modal_projector tensors are missing: {absent}")
    connector_state = {ours: p[theirs] for ours, theirs in names.items()}
    llm_state = {f"model.{k}": v for k, v in parts["llm"].items()} | {f"lm_head.{k}": v for k, v in parts["head"].items()}
    settings = _image_processor_settings(folder)
    size = (settings.get("size") or {}).get("height") or vision_cfg.image_size[0]
    patch = vision_cfg.patch_size[0] if isinstance(vision_cfg.patch_size, (list, tuple)) else vision_cfg.patch_size
    processor_cfg = _read_json(folder / "processor_config.json")
    image_token = processor_cfg.get("image_token", "<IMG_CONTEXT>")
    tokenizer = _tokenizer(folder, image_token)

    tmp = _staging(out)
    try:
        staged_llm = stage_llm(tmp, _causal_lm_from_state(text_cfg, llm_state, cfg), tokenizer)
        config = load_config({"model": {
            "vision": {"name": "hf-random", "model_type": "internvl_vision", "config": _hf_config_dict(vision_cfg),
                       "feature_layer": cfg.vision_feature_layer},
            "connector": {"name": "pixel-shuffle", "options": {"ratio": cfg.downsample_ratio, "norm": "post", "norm_eps": 1e-5,
                                                               "projector": "mlp", "hidden_size": text_cfg.hidden_size}},
            "llm": {"name": "hf", "path": str(staged_llm)},
            "processor": {"name": "dynamic", "image_size": size, "mean": list(settings.get("image_mean", (0.485, 0.456, 0.406))),
                          "std": list(settings.get("image_std", (0.229, 0.224, 0.225))), "resample": _resample(settings),
                          "options": {"patch_size": patch, "downsample_ratio": cfg.downsample_ratio,
                                      "min_num": int(settings.get("min_patches", 1)),
                                      "max_num": int(settings.get("max_patches", 12)) if settings.get("crop_to_patches", True) else 1,
                                      "use_thumbnail": bool(settings.get("use_thumbnail", True)), "sentinels": "never"}},
            "image_token": image_token,
        }})
        model = build_imported(config, image_token, cfg.image_token_id)
        load_part(model.vision.model, parts["vision"], "vision tower", "model.vision_tower.")
        load_part(model.connector, connector_state, "projector", "model.multi_modal_projector(mapped) ")
        return _write_checkpoint(model, config, folder, out, staged_llm, tmp, max_positions(text_cfg, 2048))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- export ----------------------------------------------------------------------------------


def _owner(model) -> HFFamily:
    return next(f for f in _families() if f.owns(model))


def family_of(model) -> str:
    """Which transformers family a vlmkit model exports to."""
    family = _owner(model)
    return family.model_types[0] if family.model_types[0] != "qwen2_vl" or not _is_qwen25(model) else "qwen2_5_vl"


def _is_qwen25(model) -> bool:
    from vlmkit.model.qwen2vl import Qwen25ViTTower

    return isinstance(model.vision, Qwen25ViTTower)


def _plain_template(tokenizer) -> str | None:
    """The chat template as the source folder had it (import may have wrapped it)."""
    template = tokenizer.chat_template
    if isinstance(template, str) and template.startswith(_STRING_TO_PARTS_PREAMBLE):
        return template[len(_STRING_TO_PARTS_PREAMBLE):]
    if isinstance(template, str) and (inner := _plain_of_image_parts(template)) is not None:
        return inner
    return template


def _atomic_folder(out: Path, write) -> Path:
    """Have `write` fill a staging folder beside `out`, then swap it in (`vlmkit.hf.output_folder`)."""
    tmp = staging_folder(out)
    try:
        write(tmp)
        respect_umask(tmp)
        return publish(tmp, out, command=EXPORT_COMMAND)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap: the previous export


def _generation_config(tokenizer, **kw):
    from transformers import GenerationConfig

    from vlmkit.hf.llava import _stop_ids

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(eos_token_id=_stop_ids(tokenizer), pad_token_id=pad_id, bos_token_id=tokenizer.bos_token_id,
                            do_sample=False, **kw)


@torch.no_grad()
def export_qwen2_vl(model, out: str | Path) -> Path:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlmkit.hf.reference import qwen2_5_vl, qwen2_vl

    ref = (qwen2_5_vl if family_of(model) == "qwen2_5_vl" else qwen2_vl)(model).eval()
    tok = model.tokenizer
    vocab = tok.get_vocab()
    for name, token in (("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
                        ("video_token_id", "<|video_pad|>")):
        if token in vocab:
            setattr(ref.config, name, vocab[token])
    ref.config.tie_word_embeddings = bool(getattr(model.llm.config, "tie_word_embeddings", False))
    ref.generation_config = _generation_config(tok)
    p = model.config.processor
    o = p.options
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": o.get("min_pixels", 56 * 56), "longest_edge": o.get("max_pixels", 28 * 28 * 1280)},
        patch_size=o.get("patch_size", 14), merge_size=o.get("merge_size", 2), temporal_patch_size=o.get("temporal_patch_size", 2),
        image_mean=list(p.mean), image_std=list(p.std), resample={"bicubic": 3, "bilinear": 2, "nearest": 0}[p.resample])

    def write(tmp: Path) -> None:
        ref.save_pretrained(tmp, safe_serialization=True)
        image_processor.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        template = _plain_template(tok)
        if template:
            (tmp / "chat_template.jinja").write_text(template)
        (tmp / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor" if family_of(model) == "qwen2_5_vl" else "Qwen2VLProcessor",
                                                               "image_token": model.config.image_token}, indent=2))
        if getattr(model.config, "video_token", None) and (o.get("video_min_pixels") or o.get("video_max_pixels")):
            (tmp / "video_preprocessor_config.json").write_text(json.dumps(_qwen2_vl_video_settings(model), indent=2))

    return _atomic_folder(Path(out), write)


def _qwen2_vl_video_settings(model) -> dict:
    """Qwen2VLVideoProcessor's settings for the model's video side (written as JSON: the class
    itself needs torchvision)."""
    p = model.config.processor
    o, video = p.options, dict(p.options.get("video") or {})
    settings = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": o.get("patch_size", 14),
                "merge_size": o.get("merge_size", 2), "temporal_patch_size": o.get("temporal_patch_size", 2),
                "size": {"shortest_edge": o.get("video_min_pixels") or o.get("min_pixels", 56 * 56),
                         "longest_edge": o.get("video_max_pixels") or o.get("max_pixels", 28 * 28 * 1280)},
                "image_mean": list(p.mean), "image_std": list(p.std), "do_rescale": True, "do_normalize": True,
                "resample": {"bicubic": 3, "bilinear": 2, "nearest": 0}[p.resample], "do_sample_frames": False}
    if video.get("sampling") == "fps":
        settings |= {"do_sample_frames": True, "fps": video.get("fps", 2.0), "min_frames": video.get("min_frames", 4),
                     "max_frames": video.get("max_frames", 768)}
    elif "num_frames" in video:
        settings |= {"do_sample_frames": True, "num_frames": video["num_frames"]}
    return settings


@torch.no_grad()
def export_llava_next(model, out: str | Path) -> Path:
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from vlmkit.hf.reference import llava_next

    ref = llava_next(model).eval()
    tok = model.tokenizer
    ref.generation_config = _generation_config(tok)
    p = model.config.processor
    s = p.image_size
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=[list(x) for x in model.image_processor.grid_pinpoints],
        image_mean=list(p.mean), image_std=list(p.std), resample={"bicubic": 3, "bilinear": 2, "nearest": 0}[p.resample])
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=model.vision.patch_size,
                                   vision_feature_select_strategy=ref.config.vision_feature_select_strategy,
                                   chat_template=_plain_template(tok), image_token=model.config.image_token,
                                   num_additional_image_tokens=1 if model.vision.has_cls else 0)

    return _save_with_processor(ref, processor, out)


def _load_reference(ref, state: dict, family: str) -> None:
    """Put vlmkit's weights into the transformers model; only rotary buffers may be left unset."""
    missing, unexpected = ref.load_state_dict(state, strict=False)
    if [m for m in missing if "rotary" not in m] or unexpected:
        raise ExportError(f"weights do not map onto {family} (missing {missing[:5]}, unexpected {unexpected[:5]})")


def _save_with_processor(ref, processor, out: str | Path) -> Path:
    """The model and its processor files, written into one folder swapped into place."""

    def write(tmp: Path) -> None:
        ref.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    return _atomic_folder(Path(out), write)


@torch.no_grad()
def idefics3_reference(model, config_cls=None, model_cls=None, tower_type: str = "siglip_vision_model"):
    """transformers' Idefics3 (or, given SmolVLM's classes and tower, SmolVLM) holding the vlmkit
    model's weights, with its generation config."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    from vlmkit.model.connectors.pixel_shuffle import PixelShuffleConnector
    from vlmkit.model.vision import HFVisionTower

    config_cls, model_cls = config_cls or Idefics3Config, model_cls or Idefics3ForConditionalGeneration
    family = config_cls.__name__.removesuffix("Config")
    conn, tower = model.connector, model.vision
    if (not isinstance(conn, PixelShuffleConnector) or conn.options.norm != "none" or conn.options.projector != "linear"
            or conn.options.bias or not isinstance(tower, HFVisionTower) or tower.model.config.model_type != tower_type
            or tower.feature_layer != -1):
        raise ExportError(f"{family} needs a {tower_type} tower (last layer) and a pixel-shuffle connector with no norm and one "
                          "bias-free linear layer")
    vision = {k: v for k, v in _hf_config_dict(tower.model.config).items() if k not in ("vision_use_head",)}
    text = _hf_config_dict(model.llm.config) | {"model_type": model.llm.config.model_type}
    config = config_cls(vision_config=vision, text_config=text, image_token_id=model.image_token_id,
                        scale_factor=conn.factor, tie_word_embeddings=bool(getattr(model.llm.config, "tie_word_embeddings", False)))
    ref = model_cls(config).eval()
    state = {f"model.vision_model.{k}": v for k, v in tower.model.state_dict().items() if "position_ids" not in k}
    state["model.connector.modality_projection.proj.weight"] = conn.proj.weight
    state |= {f"model.text_model.{k}": v for k, v in model.llm.base_model.state_dict().items()}
    state["lm_head.weight"] = model.llm.get_output_embeddings().weight
    _load_reference(ref, state, family)
    ref.generation_config = _generation_config(model.tokenizer)
    return ref


@torch.no_grad()
def export_idefics3(model, out: str | Path) -> Path:
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    ref = idefics3_reference(model)
    tok = model.tokenizer
    o = model.config.processor.options
    p = model.config.processor
    resample = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}[o.get("resample", "lanczos")]
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": o.get("longest_edge", 4 * p.image_size)},
                                                max_image_size={"longest_edge": p.image_size}, resample=resample,
                                                do_image_splitting=o.get("do_image_splitting", True),
                                                image_mean=list(p.mean), image_std=list(p.std))
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=model.image_processor.image_seq_len,
                                  chat_template=_plain_template(tok))

    return _save_with_processor(ref, processor, out)


@torch.no_grad()
def export_internvl(model, out: str | Path) -> Path:
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from vlmkit.model.connectors.pixel_shuffle import PixelShuffleConnector
    from vlmkit.model.vision import HFVisionTower

    conn, tower = model.connector, model.vision
    if (not isinstance(conn, PixelShuffleConnector) or conn.options.norm != "post" or conn.options.projector != "mlp"
            or conn.options.norm_kind != "layernorm" or not isinstance(tower, HFVisionTower)
            or tower.model.config.model_type != "internvl_vision"):
        raise ExportError("InternVL needs its own ViT (internvl_vision) and a pixel-shuffle connector with a LayerNorm after the "
                          "merge and the 2-layer GELU MLP")
    tok = model.tokenizer
    text = _hf_config_dict(model.llm.config) | {"model_type": model.llm.config.model_type}
    config = InternVLConfig(vision_config=_hf_config_dict(tower.model.config), text_config=text, image_token_id=model.image_token_id,
                            downsample_ratio=conn.options.ratio, vision_feature_layer=tower.feature_layer,
                            vision_feature_select_strategy="default", projector_hidden_act="gelu",
                            tie_word_embeddings=bool(getattr(model.llm.config, "tie_word_embeddings", False)))
    ref = InternVLForConditionalGeneration(config).eval()
    state = {f"model.vision_tower.{k}": v for k, v in tower.model.state_dict().items()}
    names = {"norm.weight": "layer_norm.weight", "norm.bias": "layer_norm.bias", "proj.0.weight": "linear_1.weight",
             "proj.0.bias": "linear_1.bias", "proj.2.weight": "linear_2.weight", "proj.2.bias": "linear_2.bias"}
    cstate = conn.state_dict()
    state |= {f"model.multi_modal_projector.{theirs}": cstate[ours] for ours, theirs in names.items()}
    state |= {f"model.language_model.{k}": v for k, v in model.llm.base_model.state_dict().items()}
    state["lm_head.weight"] = model.llm.get_output_embeddings().weight
    _load_reference(ref, state, "InternVL")
    ref.generation_config = _generation_config(tok)
    p, proc = model.config.processor, model.image_processor
    image_processor = GotOcr2ImageProcessorPil(size={"height": p.image_size, "width": p.image_size}, crop_to_patches=proc.max_num > 1,
                                               min_patches=proc.min_num, max_patches=proc.max_num, use_thumbnail=proc.use_thumbnail,
                                               image_mean=list(p.mean), image_std=list(p.std),
                                               resample={"bicubic": 3, "bilinear": 2, "nearest": 0}[p.resample])
    tokens_per_tile = conn.num_tokens(tower.grid(p.image_size))

    def write(tmp: Path) -> None:
        ref.save_pretrained(tmp, safe_serialization=True)
        image_processor.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        template = _plain_template(tok)
        if template:
            (tmp / "chat_template.jinja").write_text(template)
        (tmp / "processor_config.json").write_text(json.dumps({
            "processor_class": "InternVLProcessor", "image_seq_length": tokens_per_tile, "image_token": model.config.image_token}, indent=2))

    return _atomic_folder(Path(out), write)


def export_hf(model, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write `model` in its family's transformers format. An existing `out` is replaced only when
    it is empty or an earlier export, or when `overwrite` is set; never when it holds the model's
    own LLM folder (an imported checkpoint)."""
    out = claim_output(out, command=EXPORT_COMMAND, sources=model_sources(model), overwrite=overwrite)
    return _owner(model).exporter(model, out)


def model_sources(model) -> tuple[Path, ...]:
    """Local folders a loaded model still reads from (its LLM folder): an export may not replace them."""
    path = getattr(model.config.llm, "path", None)
    return (Path(path),) if path and Path(path).exists() else ()


@torch.no_grad()
def verify_hf_export(model, folder: str | Path) -> float:
    """Largest |logit difference| between vlmkit and transformers' reload of the export, on one
    image+text prompt of the family's own layout."""
    from PIL import Image

    from vlmkit.data.formats import Message
    from vlmkit.hf.llava import verify_export
    from vlmkit.processing import build_chat_processor

    family = _owner(model)
    if family.reference is None:  # LLaVA-1.5
        return verify_export(model, folder)
    offline()
    g = torch.Generator().manual_seed(0)
    size = model.config.processor.image_size
    image = Image.fromarray((torch.rand(size, size * 3 // 2, 3, generator=g) * 255).byte().numpy())
    prompt = build_chat_processor(model, 1 << 20).encode_prompt([Message("user", "<image>\nDescribe the image.")], [image])
    ids = prompt.input_ids[None]
    cls, kwargs = family.reference(model, prompt, ids)
    extra = {"position_ids": prompt.position_ids[:, None].to(model.device)} if prompt.position_ids is not None else {}
    ours = model(ids.to(model.device), images=prompt.images, **extra)
    ref = cls.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    theirs = ref(input_ids=ids, **kwargs).logits.float()
    ours = ours.logits.float().cpu()
    return float((ours - theirs[..., : ours.shape[-1]]).abs().max())


def _qwen2_vl_reference(model, prompt, ids):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = Qwen2_5_VLForConditionalGeneration if _is_qwen25(model) else Qwen2VLForConditionalGeneration
    return cls, {"pixel_values": prompt.images[0].pixel_values, "image_grid_thw": torch.tensor([prompt.images[0].views[0].grid]),
                 "mm_token_type_ids": (ids == model.image_token_id).int()}


def _idefics3_reference(model, prompt, ids):
    from transformers import Idefics3ForConditionalGeneration

    return Idefics3ForConditionalGeneration, {"pixel_values": prompt.images[0].pixel_values[None]}


def _internvl_reference(model, prompt, ids):
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration, {"pixel_values": prompt.images[0].pixel_values}


def _llava_next_reference(model, prompt, ids):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration, {"pixel_values": prompt.images[0].pixel_values[None],
                                               "image_sizes": torch.tensor([list(prompt.images[0].image_size)])}


def _processor_is(name: str) -> Callable[[Any], bool]:
    return lambda model: model.config.processor.name == name


def _is_qwen2_vl(model) -> bool:
    from vlmkit.model.qwen2vl import Qwen2ViTTower

    return isinstance(model.vision, Qwen2ViTTower)


# Registered least specific first: `family_of` asks the newest registration first.
register_family(HFFamily(("llava",), "LLaVA-1.5 (LlavaForConditionalGeneration)", import_llava,
                         lambda model, out: export_llava(model, out), lambda model: True))
register_family(HFFamily(("llava_next",), "LLaVA-NeXT (LlavaNextForConditionalGeneration)", import_llava_next,
                         export_llava_next, _processor_is("anyres"), _llava_next_reference))
register_family(HFFamily(("qwen2_vl", "qwen2_5_vl"), "Qwen2-VL / Qwen2.5-VL (Qwen2VLForConditionalGeneration, "
                         "Qwen2_5_VLForConditionalGeneration)", import_qwen2_vl, export_qwen2_vl, _is_qwen2_vl, _qwen2_vl_reference))
register_family(HFFamily(("idefics3",), "Idefics3 / SmolVLM (Idefics3ForConditionalGeneration)", import_idefics3,
                         export_idefics3, _processor_is("idefics3"), _idefics3_reference))
register_family(HFFamily(("internvl",), "InternVL (transformers' InternVLForConditionalGeneration)", import_internvl,
                         export_internvl, _processor_is("dynamic"), _internvl_reference))
