"""Reading and checking a Hugging Face model folder, before anything is built: JSON files (named in
every error, nesting and types checked), the transformers config, the tokenizer, safetensors
weights only from inside the folder (headers checked against the config first), processor
settings, and loading a part's weights with every missing or mis-shaped tensor named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from vlmkit.core.json_text import parse_json_bytes


class ExportError(ValueError):
    """A model that cannot be expressed as the other side's architecture; says why."""


# Keys of a Hugging Face config dict that describe the file, not the architecture.
_FILE_KEYS = ("architectures", "transformers_version", "_name_or_path", "model_type", "auto_map", "output_hidden_states",
              "return_dict", "use_cache", "torch_dtype", "dtype", "_attn_implementation_autoset")


def hf_config_dict(cfg) -> dict:
    d = cfg.to_dict()
    return {k: v for k, v in d.items() if k not in _FILE_KEYS}


def read_json(path: Path, required: bool = False) -> dict:
    """A JSON object file of a model folder ({} when absent, unless `required`). Whatever is wrong
    with it (not UTF-8, not JSON, nested past Python's recursion limit, not an object) is an
    ExportError naming the file."""
    if not path.is_file():
        if required:
            raise ExportError(f"{path} is missing")
        return {}
    value = parse_json_bytes(path.read_bytes(), str(path), ExportError)
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


def vetted_config(folder: Path, supported: Callable[[], str] = lambda: "") -> dict:
    """`config.json` as JSON, refused when the folder or file is missing or when it names remote
    code (`supported()` lists what vlmkit imports, for the message)."""
    path = folder / "config.json"
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder")
    if not path.is_file():
        raise ExportError(f"{folder} has no config.json: not a Hugging Face model folder")
    cfg = read_json(path)
    if "auto_map" in cfg:
        # auto_map points at Python files in the folder that transformers would import and run.
        raise ExportError(f"{path} has an auto_map: the model needs trust_remote_code (its own Python code), "
                          "which vlmkit never runs. Supported families: " + supported())
    return cfg


def auto_config(folder: Path):
    """transformers' config object for the folder (read_hf_config has vetted the file); a field of
    the wrong type is an ExportError naming config.json, not transformers' own exception."""
    from transformers import AutoConfig

    vetted_config(folder)
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
        read_json(folder / name)
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
        weight_map = read_json(index).get("weight_map")
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

    visit(read_json(path), "")


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


def load_exact(module, state: dict, what: str) -> None:
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


def image_processor_settings(folder: Path) -> dict:
    # transformers 5 nests the image processor inside processor_config.json; older folders keep
    # it in preprocessor_config.json.
    return read_json(folder / "processor_config.json").get("image_processor") or read_json(folder / "preprocessor_config.json")


def resample_name(settings: dict) -> str:
    return {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(settings.get("resample", 3), "bicubic")


def max_positions(text_cfg, default: int, cap: int | None = None) -> int:
    """The LLM's context length from its config (`default` where it gives none), for
    `train.max_length`; `cap` bounds configs that claim more than a recipe should default to."""
    n = int(getattr(text_cfg, "max_position_embeddings", default) or default)
    return min(n, cap) if cap else n


def causal_lm_state(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A folder's decoder weights under a causal LM's names: its body (`parts["llm"]`) under
    `model.`, its head (`parts["head"]`) under `lm_head.`."""
    return {f"model.{k}": v for k, v in parts["llm"].items()} | {f"lm_head.{k}": v for k, v in parts["head"].items()}


def causal_lm_from_state(text_cfg, state: dict[str, torch.Tensor], outer=None):
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
