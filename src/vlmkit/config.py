"""Validated configuration: pydantic models, YAML recipes, dotted command-line overrides.

A recipe is YAML; `a.b.c=value` overrides are merged into it with OmegaConf (so values are
parsed the way YAML parses them), and the merged tree is validated by pydantic with
`extra="forbid"`, so a misspelt key fails loudly with its dotted path instead of being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

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
    # Pillow formats decoded (None: PNG, JPEG, WEBP, GIF, BMP, TIFF); EPS is never allowed.
    image_formats: list[str] | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("image_formats")
    @classmethod
    def _known_formats(cls, v):
        if v is None:
            return v
        from vlmkit.processing.images import image_formats

        return list(image_formats(v))


class ModelConfig(Strict):
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


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def load_config(
    recipe: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """Load a YAML recipe (or dict), apply `a.b=c` overrides, validate."""
    source = "defaults"
    base: dict[str, Any] = {}
    if isinstance(recipe, (str, Path)):
        source = str(recipe)
        try:
            base = yaml.safe_load(Path(recipe).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"recipe file not found: {recipe}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {recipe} is not valid YAML: {e}") from None
        if not isinstance(base, dict):
            raise ConfigError(f"recipe {recipe} must be a mapping at the top level")
    elif isinstance(recipe, dict):
        source = "dict"
        base = recipe
    try:
        merged = OmegaConf.merge(OmegaConf.create(base), OmegaConf.from_dotlist(list(overrides)))
        tree = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad override in {list(overrides)}: {e}") from None
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        if overrides:
            source += f" with overrides {list(overrides)}"
        raise ConfigError(_format_validation_error(e, source)) from None


def dump_config(config: Config) -> dict[str, Any]:
    return config.model_dump(mode="json")
