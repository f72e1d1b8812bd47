"""Validated configuration: pydantic models, YAML recipes, dotted command-line overrides.

A recipe is YAML; `a.b.c=value` overrides are merged into it with OmegaConf (so values are
parsed the way YAML parses them), and the merged tree is validated by pydantic with
`extra="forbid"`, so a misspelt key fails loudly with its dotted path instead of being ignored.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A recipe or override that does not validate; the message names every bad field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class VisionConfig(Strict):
    # Registry key in VISION_TOWERS: "efficientnet-lite0" (packaged ImageNet weights),
    # "hf" (a SigLIP / CLIP / ViT vision tower from a local folder), "hf-random" (from `config`).
    name: str = "efficientnet-lite0"
    path: str | None = None
    # For random-init towers: keyword arguments of the Hugging Face config class.
    config: dict[str, Any] | None = None
    model_type: str = "siglip_vision_model"
    # Which hidden state of a transformer tower feeds the connector (LLaVA uses the penultimate).
    feature_layer: int = -1


class ConnectorConfig(Strict):
    # Registry key in CONNECTORS.
    name: str = "mlp"
    # Family-specific settings, validated by the connector's own options model at build time.
    options: dict[str, Any] = Field(default_factory=dict)


class LLMConfig(Strict):
    # Registry key in LANGUAGE_MODELS: "smollm2-135m-instruct" (packaged GGUF), "hf" (a local
    # folder, or a GGUF file with `gguf_file`), "hf-random" (from `config`, for tests).
    name: str = "smollm2-135m-instruct"
    path: str | None = None
    gguf_file: str | None = None
    config: dict[str, Any] | None = None
    model_type: str = "llama"


class ProcessorConfig(Strict):
    # Registry key in IMAGE_PROCESSORS.
    name: str = "fixed"
    image_size: int = 224
    # EfficientNet-Lite's normalisation is (x - 127) / 128 on 0..255 pixels.
    mean: tuple[float, float, float] = (127.0 / 255, 127.0 / 255, 127.0 / 255)
    std: tuple[float, float, float] = (128.0 / 255, 128.0 / 255, 128.0 / 255)
    resample: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    # Decompression-bomb guard, in pixels.
    max_image_pixels: int = 64_000_000
    options: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(Strict):
    # A vlmkit checkpoint folder to start from (fine-tuning): its model settings are the defaults
    # of this section and its saved weights are loaded before the first stage. Relative to the
    # working directory, like train.output_dir.
    init_from: str | None = None
    vision: VisionConfig = Field(default_factory=VisionConfig)
    connector: ConnectorConfig = Field(default_factory=ConnectorConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    processor: ProcessorConfig = Field(default_factory=ProcessorConfig)
    fusion: Literal["prefix", "cross-attention"] = "prefix"
    image_token: str = "<image>"


PART_NAMES = ("vision", "connector", "llm", "cross_attention")


class DPOConfig(Strict):
    # Strength of the KL anchor to the reference: the implicit reward is beta * log(pi / pi_ref).
    beta: float = Field(default=0.1, gt=0)
    # "precompute": the reference is the policy as it enters the stage, scored once before the
    #   first step (no second model in memory; the log-probs travel in the resume state).
    # "model": a frozen copy of that policy, scored alongside every step (same numbers, more memory).
    # "data": each record carries `ref_chosen_logp` / `ref_rejected_logp` computed beforehand.
    reference: Literal["precompute", "model", "data"] = "precompute"
    # Conservative DPO: the share of pairs assumed to be labelled the wrong way round.
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)


class StageConfig(Strict):
    """One alignment stage. Which parts train, and at what learning rate, is data."""

    data: str
    trainable: list[str]
    lr: float = Field(gt=0)
    # Per-part learning rates, e.g. {"llm": 2e-5} while the connector keeps `lr`.
    part_lr: dict[str, float] = Field(default_factory=dict)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = 1.0
    # "sft": next-token loss on assistant turns (LLaVA JSON); "dpo": preference pairs (TRL,
    # RLAIF-V or LLaVA-RLHF records, detected per record).
    loss: Literal["sft", "dpo"] = "sft"
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    # SFT reduction: "token" weighs every supervised token of the optimizer step equally;
    # "sample" averages each sample's mean token loss, so long answers do not dominate.
    loss_reduction: Literal["token", "sample"] = "token"
    # Pack each micro-batch's samples into rows of at most `pack_length` tokens (default:
    # train.max_length). Samples in a row cannot attend to each other; padding shrinks to the
    # tail of the shortest rows. The micro-batch (and so the loss) is the same as unpacked.
    packing: bool = False
    pack_length: int | None = Field(default=None, gt=0)
    max_images_per_pack: int | None = Field(default=None, gt=0)

    @field_validator("trainable")
    @classmethod
    def _known_parts(cls, parts: list[str]) -> list[str]:
        unknown = [p for p in parts if p not in PART_NAMES]
        if unknown:
            raise ValueError(f"unknown parts {unknown}; parts are {list(PART_NAMES)}")
        return parts

    @model_validator(mode="after")
    def _part_lr_parts(self) -> "StageConfig":
        unknown = [p for p in self.part_lr if p not in PART_NAMES]
        if unknown:
            raise ValueError(f"part_lr names unknown parts {unknown}")
        return self


class TrainConfig(Strict):
    # Ordered: stages run in the order they are written.
    stages: dict[str, StageConfig] = Field(default_factory=dict)
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    device: str = "cpu"
    max_length: int = 512
    output_dir: str = "runs/default"
    # Folder that relative stage `data` paths resolve against. Unset: a path written in a recipe
    # file is relative to that file's folder, one given as a command-line override to the
    # working directory.
    data_dir: str | None = None
    # Bad records (missing image, no placeholder, too long): raise, or skip and count them.
    on_bad_record: Literal["error", "skip"] = "error"
    log_every: int = Field(default=1, gt=0)
    save_every: int | None = None
    num_workers: int = 0
    # Encode each image once when the vision tower is frozen (it never changes during the stage).
    cache_frozen_vision: bool = True
    # Periodic checkpoints kept per stage (the newest is `<stage>-last`, older ones `<stage>-step-N`).
    keep_last: int = Field(default=2, gt=0)
    # Under torchrun: "ddp" replicates the model; "fsdp2" shards parameters, gradients and
    # optimizer state with `fully_shard`. Ignored in a single process. `batch_size` is global:
    # every rank takes batch_size / world_size samples of each micro-batch.
    distributed: Literal["ddp", "fsdp2"] = "ddp"
    # Dense peak of the accelerator in TFLOP/s for MFU; None: looked up for known GPUs
    # (bf16 tensor-core peak), and MFU is left out where unknown (CPUs).
    peak_tflops: float | None = Field(default=None, gt=0)


class Config(Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed where `loc` points (walking models and dicts of models)."""
    annotation: Any = model
    for part in loc:
        target = _model_in(annotation)
        if target is not None and isinstance(part, str) and part in target.model_fields:
            annotation = target.model_fields[part].annotation
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        else:
            return []
    target = _model_in(annotation)
    return list(target.model_fields) if target is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):  # Optional[Model], Model | None
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(root)"
        message = e["msg"]
        if e["type"] == "extra_forbidden" and e["loc"]:
            message = "unknown key"
            known = _fields_at(Config, e["loc"][:-1])
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1, cutoff=0.6)
            message += f"; did you mean {close[0]!r}?" if close else f"; known keys here: {', '.join(known)}"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def load_config(
    recipe: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    init_defaults: bool = True,
) -> Config:
    """Load a YAML recipe (or dict), apply `a.b=c` overrides, validate.

    Relative stage data paths become absolute here (see `TrainConfig.data_dir`), so the config
    means the same whatever folder the command runs in. `init_defaults`: fill the model section
    from `model.init_from`'s checkpoint (off when reading a checkpoint's own, complete config).
    """
    source = "defaults"
    base: dict[str, Any] = {}
    recipe_dir = Path.cwd()
    if isinstance(recipe, (str, Path)):
        source = str(recipe)
        try:
            base = yaml.safe_load(Path(recipe).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"recipe file not found: {Path(recipe).resolve()}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {recipe} is not valid YAML: {e}") from None
        if not isinstance(base, dict):
            raise ConfigError(f"recipe {recipe} must be a mapping at the top level")
        recipe_dir = Path(recipe).resolve().parent
    elif isinstance(recipe, dict):
        source = "dict"
        base = recipe
    try:
        override_tree = OmegaConf.from_dotlist(list(overrides))
        merged = OmegaConf.merge(OmegaConf.create(base), override_tree)
        tree = OmegaConf.to_container(merged, resolve=True)
        given_on_command_line = OmegaConf.to_container(override_tree, resolve=False)
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad override in {list(overrides)}: {e}") from None
    if overrides:
        source += f" with overrides {list(overrides)}"
    if init_defaults and isinstance(tree, dict):
        tree = _with_init_defaults(tree, source)
    try:
        config = Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
    _resolve_data_paths(config, recipe_dir, given_on_command_line)
    return config


def _with_init_defaults(tree: dict[str, Any], source: str) -> dict[str, Any]:
    """The model section of `model.init_from`'s checkpoint, with the recipe's own model keys on top."""
    import json

    model = tree.get("model")
    init_from = model.get("init_from") if isinstance(model, dict) else None
    if not init_from:
        return tree
    saved = Path(init_from) / "config.json"
    if not saved.is_file():
        raise ConfigError(f"model.init_from ({source}): {Path(init_from).resolve()} is not a vlmkit checkpoint (no config.json)")
    saved_model = json.loads(saved.read_text()).get("model", {})
    saved_model.pop("init_from", None)
    merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(saved_model), OmegaConf.create(model)))
    merged["init_from"] = str(Path(init_from).resolve())
    return {**tree, "model": merged}


def _resolve_data_paths(config: Config, recipe_dir: Path, given_on_command_line: Any) -> None:
    cli_stages = ((given_on_command_line or {}).get("train") or {}).get("stages") or {}
    cli_train = (given_on_command_line or {}).get("train") or {}
    data_dir = None
    if config.train.data_dir:
        data_dir = _absolute(config.train.data_dir, Path.cwd() if "data_dir" in cli_train else recipe_dir)
        config.train.data_dir = str(data_dir)
    for name, stage in config.train.stages.items():
        on_command_line = isinstance(cli_stages.get(name), dict) and "data" in cli_stages[name]
        folder = data_dir or (Path.cwd() if on_command_line else recipe_dir)
        stage.data = str(_absolute(stage.data, folder))


def _absolute(path: str, folder: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else folder / p


def dump_config(config: Config) -> dict[str, Any]:
    return config.model_dump(mode="json")
