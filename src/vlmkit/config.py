"""Validated configuration: pydantic models, YAML recipes, dotted command-line overrides.

A recipe is YAML; `a.b.c=value` overrides are merged into it with OmegaConf (so values are
parsed the way YAML parses them), and the merged tree is validated by pydantic with
`extra="forbid"`, so a misspelt key fails loudly with its dotted path instead of being ignored.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlmkit.core.image_formats import image_formats
from vlmkit.core.precision import resolve_precision


# AdamW steps each weight by about the learning rate; past 1 (or with weight decay past 1, where
# lr * weight_decay > 1 flips the sign of every weight) no run learns anything.
MAX_LR = 1.0
# numpy's seeds are 32-bit (`seed_everything` seeds it with `train.seed`).
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A recipe or override that does not validate; the message names every bad field."""


class Strict(BaseModel):
    # The docstring under each field is its description: `vlmkit recipe --schema` and
    # docs/recipes.md are generated from them, so the reference cannot drift from the code.
    # Every float of every section must be finite: an `inf` learning rate or a `nan` clipping norm
    # (`1e309` reads as inf) would otherwise train non-finite weights, or fail steps later.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True, allow_inf_nan=False)


class VisionConfig(Strict):
    """The image encoder."""

    name: str = "efficientnet-lite0"
    """Which tower, e.g. `efficientnet-lite0` (packaged ImageNet weights), `hf` (a SigLIP / CLIP /
    ViT tower from the local folder `path`), `hf-random` (random weights from `config`)."""
    path: str | None = None
    """Local folder of a Hugging Face vision model (with `name: hf`)."""
    config: dict[str, Any] | None = None
    """Random-init towers: keyword arguments of the Hugging Face config class."""
    model_type: str = "siglip_vision_model"
    """Random-init towers: the Hugging Face model type of `config`."""
    feature_layer: int = -1
    """Which hidden state of a transformer tower feeds the connector (-2: the penultimate, as LLaVA);
    for EfficientNet-Lite, -1 is the 1280-channel head conv and -2 the 320-channel last block."""


class ConnectorConfig(Strict):
    """Maps vision features into the LLM's embedding space."""

    name: str = "mlp"
    """Connector family (`mlp` is LLaVA's 2-layer GELU MLP)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Family-specific settings (e.g. `{input_norm: true}`, `{ratio: 0.5}`), validated by the family
    when the model is built; `cross_attention: {every: N}` adds gated cross-attention blocks."""
    output_norm: Literal["none", "text"] = "none"
    """`text`: RMS-normalise each visual token, then scale it by a learned per-channel gain that
    starts at the RMS of the LLM's token embeddings, so visual tokens enter the LLM at the scale of
    text tokens (a connector trained into a frozen LLM otherwise grows its outputs far beyond it)."""


class LLMConfig(Strict):
    """The language model."""

    name: str = "smollm2-135m-instruct"
    """Which LLM, e.g. `smollm2-135m-instruct` (packaged GGUF), `hf` (a local folder, or a GGUF
    file with `gguf_file`), `hf-random` (random weights from `config`)."""
    path: str | None = None
    """Local folder of a Hugging Face causal LM (with `name: hf`)."""
    gguf_file: str | None = None
    """A GGUF file inside `path` to load instead of safetensors."""
    config: dict[str, Any] | None = None
    """Random-init LLMs: keyword arguments of the Hugging Face config class."""
    model_type: str = "llama"
    """Random-init LLMs: the Hugging Face model type of `config`."""


class ProcessorConfig(Strict):
    """How an image becomes pixel tensors (and so how many visual tokens it costs)."""

    name: str = "fixed"
    """Preprocessing family (`fixed`: one square image, as LLaVA-1.5; the others tile or keep the aspect ratio)."""
    image_size: int = Field(default=224, gt=0, le=16384)
    """Side of the square image (of each tile, for tiling families), in pixels."""
    mean: tuple[float, float, float] = (127.0 / 255, 127.0 / 255, 127.0 / 255)
    """Per-channel mean subtracted from 0..1 pixels (the default is EfficientNet-Lite's (x - 127) / 128)."""
    std: tuple[float, float, float] = (128.0 / 255, 128.0 / 255, 128.0 / 255)
    """Per-channel standard deviation the pixels are divided by (each > 0)."""
    resample: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    """Resize filter."""
    max_image_pixels: int = Field(default=64_000_000, gt=0)
    """Largest image accepted, in pixels (decompression-bomb guard)."""
    image_formats: list[str] | None = None
    """Pillow formats decoded (None: PNG, JPEG, WEBP, GIF, BMP, TIFF); EPS is never allowed."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Family-specific settings, e.g. `fit: pad | squash | crop` for `fixed`."""

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v):
        if any(s <= 0 for s in v):
            raise ValueError(f"every std must be > 0 (pixels are divided by it), got {list(v)}")
        return v

    @field_validator("image_formats")
    @classmethod
    def _known_formats(cls, v):
        if v is None:
            return v
        return list(image_formats(v))


# The rules `model/attention.py` implements (a test keeps the two in step).
ATTENTION_RULE_NAMES = ("causal", "image", "prefix")


class ModelConfig(Strict):
    """The model: vision tower, connector, LLM, image processor and how they are fused."""

    init_from: str | None = None
    """A vlmkit checkpoint folder to start from (to fine-tune it): its model settings become the
    defaults of this section and its weights are loaded before the first stage. Relative to the
    working directory, like `train.output_dir`."""
    vision: VisionConfig = Field(default_factory=VisionConfig)
    """The image encoder."""
    connector: ConnectorConfig = Field(default_factory=ConnectorConfig)
    """Vision features to LLM embeddings."""
    llm: LLMConfig = Field(default_factory=LLMConfig)
    """The language model."""
    processor: ProcessorConfig = Field(default_factory=ProcessorConfig)
    """Image preprocessing."""
    fusion: Literal["prefix", "cross-attention"] = "prefix"
    """`prefix`: visual tokens in the LLM's input sequence; `cross-attention`: gated
    cross-attention blocks read them (the connector's `cross_attention` option)."""
    image_token: str = "<image>"
    """The placeholder for an image in the text of data records and prompts."""
    system_prompt: str | None = None
    """A system turn put before every conversation that has none, in training, evaluation, chat
    and serving alike; null: whatever the chat template does (SmolLM2's adds a 17-token default
    system turn). `""` keeps only the template's empty system header: a shorter, cheaper sequence."""
    video_token: str | None = None
    """The token of a video's slots where the family has its own (Qwen2-VL: `<|video_pad|>`);
    None: a video's slots use `image_token`."""
    attention: str = "causal"
    """How the LLM attends over the prompt (prefix fusion; `model/attention.py`): `causal`;
    `image`: the tokens of each image attend to each other (Gemma 3); `prefix`: prefix-LM, the
    prompt (images and text before the first answer token) attends bidirectionally (PaliGemma).
    Decoding steps are causal under every rule."""

    @field_validator("attention")
    @classmethod
    def _known_attention_rule(cls, value: str) -> str:
        if value not in ATTENTION_RULE_NAMES:
            raise ValueError(f"unknown attention rule {value!r}; known: {', '.join(ATTENTION_RULE_NAMES)}")
        return value


PART_NAMES = ("vision", "connector", "llm", "cross_attention")
# The logging libraries `train.report_to` may name; `train/reporting.py` registers one reporter
# for each (a test checks the two agree), so the recipe is checked without importing any.
REPORTER_NAMES = ("tensorboard", "wandb", "trackio")


class DPOConfig(Strict):
    """Direct preference optimisation settings (with `loss: dpo`)."""

    beta: float = Field(default=0.1, gt=0)
    """Strength of the KL anchor to the reference: the implicit reward is beta * log(pi / pi_ref)."""
    reference: Literal["precompute", "model", "data"] = "precompute"
    """`precompute`: the policy as it enters the stage, scored once before the first step (no
    second model in memory); `model`: a frozen copy of it, scored alongside every step;
    `data`: each record carries `ref_chosen_logp` / `ref_rejected_logp`."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    """Conservative DPO: the share of pairs assumed to be labelled the wrong way round."""


class GRPOConfig(Strict):
    """Group relative policy optimisation settings (with `loss: grpo`); names and defaults follow
    TRL's `GRPOConfig`. Each record's prompt is its turns before the last assistant turn, and that
    turn's text is the reference the reward compares a completion with."""

    num_generations: int = Field(default=8, ge=2)
    """Completions sampled per prompt (G); their rewards are normalised within the group, so a
    group needs at least two. A micro-batch of `batch_size` prompts holds batch_size * G completions."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    max_new_tokens: int = Field(default=256, gt=0)
    """Longest completion (TRL's `max_completion_length`); `dr_grpo` divides by it."""
    beta: float = Field(default=0.0, ge=0)
    """Weight of the KL penalty to a frozen copy of the policy as it entered the stage; 0 keeps no
    reference model at all."""
    epsilon: float = Field(default=0.2, gt=0, lt=1)
    """Clipping of the policy ratio: [1 - epsilon, 1 + epsilon_high]."""
    epsilon_high: float | None = Field(default=None, gt=0)
    """Upper clipping bound (DAPO's clip-higher, e.g. 0.28); null: `epsilon`."""
    num_iterations: int = Field(default=1, ge=1)
    """Optimizer steps on each generation batch (TRL's mu); above 1, the ratio to the policy
    that sampled the batch departs from 1 and clipping acts."""
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "dapo"
    """How token losses are averaged: `grpo` per completion, then over completions; `dr_grpo`
    summed over the step's tokens / (completions * max_new_tokens); `dapo` summed over the step's
    tokens / completion tokens in the step (TRL's definitions)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantages are reward - group mean, divided by the group's std (`group`), the whole
    step's std (`batch`) or nothing (`none`, Dr. GRPO's recommendation)."""
    reward: str | dict[str, float] = "exact"
    """A reward name, or weighted sum `{relaxed: 1.0, format: 0.2}`. Names: the scorers `exact`,
    `contains`, `vqa`, `relaxed`, `anls`, `mmmu-choice`, `mathvista`; `format` (the completion
    matches `format_pattern`); or your own function as `path/to/file.py:function` or
    `module:function` (it runs as trusted code: see docs/training.md)."""
    format_pattern: str = r"^<think>.*?</think>\s*<answer>.*?</answer>$"
    """The regular expression the `format` reward matches the whole completion against (dot matches newlines)."""

    @field_validator("reward", mode="before")
    @classmethod
    def _name_or_weights(cls, value: Any) -> Any:
        if not isinstance(value, (str, dict)):
            raise ValueError(f"a reward name, or a mapping of reward names to finite numbers (weights), not {value!r}")
        return value


class LoraConfig(Strict):
    """LoRA adapters for a stage (through peft): the named parts train only through low-rank
    adapters on the target layers; their base weights stay frozen."""

    parts: list[str] = Field(default_factory=lambda: ["llm"])
    """Parts that get adapters (each must also be listed in the stage's `trainable`)."""
    r: int = Field(default=16, gt=0, le=16384)
    """Adapter rank."""
    alpha: float = Field(default=32.0, gt=0)
    """Scaling: the update is B A * alpha / r."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the adapter's input while training."""
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Layer names (suffixes) to adapt, e.g. `[q_proj, v_proj]`, or `[all-linear]`."""
    quantize: Literal["4bit"] | None = None
    """QLoRA: the part's linear layers (not the LM head) are held as 4-bit NF4 while training
    (bitsandbytes, on a CUDA GPU or the CPU; refused elsewhere). Inference and export use the
    full-precision base with the adapters merged."""

    @field_validator("parts")
    @classmethod
    def _known_lora_parts(cls, parts: list[str]) -> list[str]:
        unknown = [p for p in parts if p not in PART_NAMES]
        if unknown or not parts:
            raise ValueError(f"lora.parts must name parts from {list(PART_NAMES)}, got {parts}")
        return parts


class LlamaFactoryEntry(Strict):
    """A LLaMA-Factory `dataset_info.json` entry's record layout, pasted as it is: the column and
    role-tag names a dataset uses instead of the defaults. Its `file_name`, `hf_hub_url` and
    similar keys are not layout, so `path` names the file instead."""

    formatting: Literal["sharegpt", "alpaca"] = "sharegpt"
    """Which of LLaMA-Factory's record styles the file holds."""
    ranking: bool = False
    """Preference pairs (`chosen` / `rejected`), read by `loss: dpo` stages."""
    columns: dict[Literal["messages", "system", "tools", "images", "videos", "chosen", "rejected", "prompt", "query",
                          "response", "history"], str] = Field(default_factory=dict)
    """LLaMA-Factory's name -> the dataset's key, e.g. `{messages: dialog, images: pictures}`."""
    tags: dict[Literal["role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag",
                       "system_tag"], str] = Field(default_factory=dict)
    """sharegpt turn keys and speaker names, e.g. `{role_tag: role, content_tag: content, user_tag:
    user, assistant_tag: assistant}` (defaults: from, value, human, gpt, observation,
    function_call, system)."""


class DataSource(Strict):
    """One source of a stage's data mixture."""

    path: str
    """A LLaVA JSON / JSONL file, a parquet file or folder of parquet shards, an arrow folder, or a
    WebDataset `.tar` shard or folder of shards (relative paths as for `data`)."""
    weight: float = Field(default=1.0, gt=0)
    """Relative share of the draws that come from this source."""
    format: Literal["auto", "llava", "parquet", "arrow", "webdataset"] = "auto"
    """`auto`: told from the file name or the folder's contents."""
    image_folder: str | None = None
    """LLaVA sources: the folder image paths resolve against (default: the data file's folder)."""
    streaming: bool = False
    """Parquet sources: read the shards through `datasets`' streaming mode (no arrow cache copy, a
    seeded shuffle buffer instead of a full shuffle; a resume reads the stream up to its position)."""
    shuffle_buffer: int = Field(default=1000, gt=0)
    """Streaming: rows in the shuffle buffer."""
    llamafactory: LlamaFactoryEntry | None = None
    """JSON / JSONL sources in LLaMA-Factory's formats with renamed columns or role tags: the
    dataset's `dataset_info.json` entry (`formatting`, `ranking`, `columns`, `tags`)."""


class StageConfig(Strict):
    """One training stage. Which parts train, and at what learning rate, is data."""

    data: str | list[DataSource]
    """The stage's data: a LLaVA JSON / JSONL file (or preference records, with `loss: dpo`), a
    parquet / arrow / WebDataset source, or a mixture `[{path, weight, format}]` sampled by weight
    from the seed. A relative path is relative to the recipe file's folder (to the working
    directory when given on the command line; to `train.data_dir` when that is set). Image paths
    in the records are relative to the data file's folder."""

    @field_validator("data")
    @classmethod
    def _some_data(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("an empty list of data sources")
        return v

    def sources(self) -> list[DataSource]:
        """The data as a list of sources (a plain path is one source of weight 1)."""
        return [DataSource(path=self.data)] if isinstance(self.data, str) else list(self.data)

    def data_names(self) -> str:
        return self.data if isinstance(self.data, str) else ", ".join(f"{s.path} ({s.weight:g})" for s in self.data)
    trainable: list[str]
    """Parts that train in this stage; the rest are frozen: any of `vision`, `connector`, `llm`,
    `cross_attention`. Also written `connector+vision` (one value with no comma, so a sweep's
    `--vary train.stages.NAME.trainable=connector,connector+vision` can cross it)."""
    lr: float = Field(gt=0, le=MAX_LR)
    """Peak learning rate (AdamW, linear warm-up then cosine decay)."""
    part_lr: dict[str, Annotated[float, Field(gt=0, le=MAX_LR)]] = Field(default_factory=dict)
    """Per-part learning rates, e.g. `{llm: 2.0e-5}` while the other parts keep `lr` (each > 0, <= 1)."""
    epochs: float = Field(default=1.0, gt=0)
    """Passes over the data (fractions allowed), when `max_steps` is not set."""
    max_steps: int | None = Field(default=None, gt=0)
    """Optimizer steps; overrides `epochs`."""
    batch_size: int = Field(default=8, gt=0, le=65536)
    """Samples per micro-batch (global: under torchrun each rank takes its share)."""
    grad_accum: int = Field(default=1, gt=0, le=65536)
    """Micro-batches per optimizer step (each is read, run forward and backward in turn)."""
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    """Share of the steps spent warming the learning rate up."""
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    """AdamW weight decay (biases and norms get none)."""
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Gradient clipping norm; null: no clipping."""
    loss: Literal["sft", "dpo", "embed-align", "grpo"] = "sft"
    """`sft`: next-token loss on the assistant turns; `dpo`: preference pairs (TRL, RLAIF-V or
    LLaVA-RLHF records, detected per record); `embed-align`: no LLM pass, each assistant token's
    input embedding is pulled toward its sample's most similar visual token (cosine), which
    writes what an image shows into the visual tokens as the LLM's own word vectors, cheaply,
    before an `sft` stage (prefix fusion, one process); `grpo`: reinforcement learning on the
    records' prompts, each completion scored by a reward against the last assistant turn."""
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    """DPO settings."""
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    """GRPO settings."""
    loss_reduction: Literal["token", "sample"] = "token"
    """SFT: `token` weighs every supervised token of the step equally; `sample` averages each
    sample's mean token loss, so long answers do not dominate."""
    packing: bool = False
    """Pack each micro-batch's samples into rows of at most `pack_length` tokens (samples in a
    row cannot attend to each other); the loss is the same as unpacked."""
    pack_length: int | None = Field(default=None, gt=0, le=2**20)
    """Row length for packing (default: `train.max_length`)."""
    max_images_per_pack: int | None = Field(default=None, gt=0)
    """Most images in one packed row."""
    lora: LoraConfig | None = None
    """Train the parts it names through LoRA adapters (e.g. `{parts: [llm], r: 16, alpha: 32,
    dropout: 0.05, targets: [q_proj, v_proj]}`); null: full fine-tuning of the trainable parts."""

    @field_validator("trainable", mode="before")
    @classmethod
    def _joined_parts(cls, parts):
        return [p.strip() for p in parts.split("+")] if isinstance(parts, str) else parts

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
        if self.lora is not None:
            outside = [p for p in self.lora.parts if p not in self.trainable]
            if outside:
                raise ValueError(f"lora.parts {outside} are not in trainable {self.trainable}; "
                                 "list them there too (they then train through their adapters only)")
        return self


class TrainEvalConfig(Strict):
    """Held-out evaluation while training: every `every` optimizer steps (and at the end of each
    stage) the model answers a slice of a registered benchmark by greedy generation, scored by the
    benchmark's own rule; the scores go to `metrics.jsonl` as `{"event": "eval", ...}` lines."""

    benchmark: str
    """A registered benchmark (`vlmkit eval list`), e.g. `synth-qa`, `chartqa`."""
    data: str
    """The benchmark's data folder or file (relative paths as for a stage's `data`)."""
    every: int = Field(default=25, gt=0)
    """Optimizer steps between evaluations."""
    limit: int | None = Field(default=None, gt=0)
    """Evaluate the first this many items (a fixed slice, the same every time); null: all."""
    max_new_tokens: int | None = Field(default=None, gt=0)
    """Generation length; null: the benchmark's default."""
    batch_size: int = Field(default=16, gt=0, le=65536)
    """Prompts generated together."""
    stages: list[str] | None = None
    """The stages that run the checks; null: every stage. (A stage that does not teach the
    answer format, such as `embed-align`, scores nothing worth the time.)"""


class StageGuardConfig(Strict):
    """The stage-boundary guard: a warning before training when a stage makes the vision tower or
    the LLM trainable while the connector is fresh (`vlmkit train` and `vlmkit recipe --check`)."""

    min_connector_steps: int = Field(default=200, ge=0)
    """Connector steps in earlier stages (or a `model.init_from` checkpoint) below which a stage
    that trains the vision tower or the LLM is warned about."""


class TrainConfig(Strict):
    """Training: the stages and what they share."""

    stages: dict[str, StageConfig] = Field(default_factory=dict)
    """The stages by name, run in the order they are written."""
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    """`bf16`: autocast the forward pass to bfloat16 (weights and optimizer stay fp32). `auto`:
    bf16 where `device` computes it natively (CUDA with bf16, a CPU with AVX512-BF16 or AMX),
    fp32 elsewhere, where bf16 is emulated and 30-56x slower; the recipe is saved with the
    precision it resolved to."""
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    """Seed of the model's random parts and of the data order."""
    device: str = "cpu"
    """Torch device: `cpu`, `cuda`, `cuda:1` ... (`vlmkit train --device` sets it)."""
    max_length: int = Field(default=512, gt=0, le=2**20)
    """Context length in tokens; a longer sample is an error naming it (image tokens are never truncated)."""
    output_dir: str = "runs/default"
    """Where checkpoints (`checkpoints/<stage>`) and `metrics.jsonl` go; relative to the working directory."""
    data_dir: str | None = None
    """A folder every relative stage `data` path resolves against, instead of the recipe's folder
    (itself relative to the recipe's folder when written there, to the working directory when
    given on the command line)."""
    on_bad_record: Literal["error", "skip"] = "error"
    """A record that cannot be used (missing image, no placeholder, too long): stop with an error
    naming it, or skip it and count it."""
    max_skip_fraction: float = Field(default=0.1, ge=0, le=1)
    """With `on_bad_record: skip`, the most a stage may leave out, as a fraction of its records;
    more stops the stage with an error (a stage with no usable record always stops)."""
    log_every: int = Field(default=1, gt=0)
    """Write a `metrics.jsonl` line every this many steps."""
    save_every: int | None = Field(default=None, gt=0)
    """Save a resumable checkpoint every this many steps (null: only at the end of each stage)."""
    num_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes that read and encode samples while the model trains (0: in the
    training process). The batches, and so the run, are the same for any number. More than the
    CPUs this process may use is capped at that count, with a warning."""
    prefetch: int = Field(default=2, gt=0, le=64)
    """Micro-batches each worker prepares ahead."""
    cache_frozen_vision: bool = True
    """Run a frozen vision tower outside the autograd graph, and keep its features in
    `feature_cache_dir` (when that is on) so each image is encoded once."""
    feature_cache: bool = True
    """Keep frozen-tower features on disk (safetensors, keyed by image content, preprocessing and
    tower weights), reused by later epochs, stages and runs."""
    feature_cache_dir: str | None = None
    """Where the feature cache lives (default: `<output_dir>/feature_cache`)."""
    feature_cache_gb: float = Field(default=20.0, gt=0)
    """Most disk the feature cache may take; beyond it, features are computed but not stored."""
    keep_last: int = Field(default=2, gt=0)
    """Periodic checkpoints kept per stage (the newest is `<stage>-last`)."""
    distributed: Literal["ddp", "fsdp2"] = "ddp"
    """Under torchrun: `ddp` replicates the model; `fsdp2` shards parameters, gradients and
    optimizer state. Ignored in a single process."""
    stage_guard: StageGuardConfig | bool = Field(default_factory=StageGuardConfig)
    """Warn when a stage trains the vision tower or the LLM before the connector has trained
    `min_connector_steps` steps in earlier stages (`{min_connector_steps: 200}`); `false`: no
    warning (as `--no-guard`)."""
    eval: TrainEvalConfig | None = None
    """Held-out evaluation while training (`{benchmark, data, every, limit}`); null: none."""
    peak_tflops: float | None = Field(default=None, gt=0)
    """Dense peak of the accelerator in TFLOP/s, for MFU; null: looked up for known GPUs (MFU is
    left out where unknown, e.g. CPUs)."""
    report_to: list[str] = Field(default_factory=list)
    """Logging libraries that get the metrics `metrics.jsonl` gets (loss, learning rate,
    throughput, held-out scores, the objective's own), each through its own API: `tensorboard`
    (event files in `<output_dir>/tensorboard`), `wandb` (offline unless `WANDB_MODE` says
    otherwise), `trackio`. Each must be installed (`pip install 'vlmkit[report]'` for
    TensorBoard); `none` or `[]`: only `metrics.jsonl`."""

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, value: Any) -> Any:
        # Written as in a Hugging Face TrainingArguments recipe: one name, or "none".
        if isinstance(value, str):
            value = [value]
        return [v for v in value if v != "none"] if isinstance(value, list) else value

    @field_validator("report_to")
    @classmethod
    def _known_reporters(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in REPORTER_NAMES:
                close = difflib.get_close_matches(name, REPORTER_NAMES, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"unknown reporter {name!r}; {hint}known: {', '.join(REPORTER_NAMES)}")
        return list(dict.fromkeys(names))

    @model_validator(mode="before")
    @classmethod
    def _resolve_precision(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("precision") == "auto":
            device = data.get("device", "cpu")
            data = {**data, "precision": resolve_precision("auto", device if isinstance(device, str) else "cpu")}
        return data

    @model_validator(mode="after")
    def _eval_stages_exist(self) -> "TrainConfig":
        unknown = [s for s in (self.eval.stages or []) if s not in self.stages] if self.eval else []
        if unknown:
            raise ValueError(f"train.eval.stages names {unknown}, but the stages are {list(self.stages)}")
        return self


class Config(Strict):
    """A recipe."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """The model."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Training."""


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed where `loc` points (walking models and dicts of models)."""
    annotation: Any = model
    for part in loc:
        target = _model_in(annotation)
        if target is not None and isinstance(part, str) and part in target.model_fields:
            annotation = target.model_fields[part].annotation
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        elif isinstance(part, int) and (lists := [a for a in (annotation, *get_args(annotation)) if get_origin(a) is list]):
            annotation = get_args(lists[0])[0]  # an item of a list (a stage's data sources)
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
    errors = err.errors()
    # A field that takes a path or a list of sources reports both union branches; when the list
    # branch has something to say, the "not a string" complaint is noise. Branch tags are dropped.
    tagged = {tuple(e["loc"][:i]) for e in errors for i, p in enumerate(e["loc"]) if isinstance(p, str) and "[" in p}
    errors = [e for e in errors if not any(p == "str" and tuple(e["loc"][:i]) in tagged for i, p in enumerate(e["loc"]))]
    for e in errors:
        e["loc"] = tuple(p for p in e["loc"] if not (isinstance(p, str) and "[" in p))
    for e in errors:
        where = ".".join(str(p) for p in e["loc"]) or "(root)"
        message = e["msg"]
        if e["type"] == "extra_forbidden" and e["loc"]:
            message = "unknown key"
            known = _fields_at(Config, e["loc"][:-1])
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1, cutoff=0.6)
            message += f"; did you mean {close[0]!r}?" if close else f"; known keys here: {', '.join(known)}"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


# Nodes that YAML aliases (`*name`, `<<: *name`) may add to a recipe by repeating what they
# name: ample for sharing settings between stages, far below an alias bomb ("billion laughs"),
# where a few hundred bytes expand to billions of nodes.
MAX_ALIAS_NODES = 10_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


def read_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load`, but refusing what it lets through silently: a key given twice in one
    mapping (the last would win, dropping the first's contents), aliases that expand past
    MAX_ALIAS_NODES or refer to themselves. Errors are ConfigErrors naming `source` and the line."""
    loader = yaml.SafeLoader(text)
    loader.name = source  # so YAML syntax errors name the file, not "<unicode string>"
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_nodes(node, source)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {e}") from None
    finally:
        loader.dispose()


def _check_yaml_nodes(root: yaml.Node, source: str) -> None:
    """Walk the composed document once (an aliased node is walked at its first use only) and
    refuse duplicate keys, recursive aliases and alias expansion past the budget."""
    sizes: dict[yaml.Node, int] = {}  # node -> nodes it expands to, once walked
    open_nodes: set[yaml.Node] = set()
    added = 0

    def line(node: yaml.Node) -> int:
        return node.start_mark.line + 1

    def walk(node: yaml.Node, path: str) -> int:
        nonlocal added
        if node in sizes:  # an alias: it repeats everything under the node it names
            added += sizes[node]
            if added > MAX_ALIAS_NODES:
                raise ConfigError(f"{source}: YAML aliases expand the recipe by more than {MAX_ALIAS_NODES} nodes "
                                  f"(at {path or 'the top level'}, an alias of line {line(node)}); write the values out instead")
            return sizes[node]
        if node in open_nodes:
            raise ConfigError(f"{source}: line {line(node)}: a YAML alias at {path or 'the top level'} refers to itself")
        open_nodes.add(node)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                total += walk(child, f"{path}[{i}]")
        elif isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                dotted = f"{path}.{name}" if path else name
                if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                    if name in first_line:
                        raise ConfigError(f"{source}: line {line(key)}: duplicate key {dotted!r} "
                                          f"(first given at line {first_line[name]}; YAML would silently keep only the last)")
                    first_line[name] = line(key)
                total += walk(key, path) + walk(value, dotted)
        open_nodes.discard(node)
        sizes[node] = total
        return total

    walk(root, "")


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
            text = Path(recipe).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"recipe file not found: {Path(recipe).resolve()}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"recipe {recipe} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        base = read_yaml(text, f"recipe {recipe}") or {}
        if not isinstance(base, dict):
            raise ConfigError(f"recipe {recipe} must be a mapping at the top level")
        recipe_dir = Path(recipe).resolve().parent
    elif isinstance(recipe, dict):
        source = "dict"
        base = recipe
    for override in overrides:
        # OmegaConf reads each value as YAML; checked here first, so that a bad one is a
        # ConfigError naming it (and older OmegaConf releases do not bound aliases).
        if "=" in override:
            read_yaml(override.split("=", 1)[1], f"override {override!r}")
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


# Model sections whose `path` names a folder of pretrained files that a checkpoint may carry
# (`<checkpoint>/llm`, `<checkpoint>/vision`), with the words an error names them by.
PART_FOLDERS = {"llm": "language model", "vision": "vision tower"}


def located_parts(model: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """The model section of a checkpoint's config.json with its part folders made absolute.

    A part the checkpoint carries is recorded relative to it (`llm`), so the checkpoint may be
    moved or copied anywhere. Checkpoints written before that recorded an absolute path: an
    import's own `<checkpoint>/llm` is still found after the checkpoint moved."""
    if not isinstance(model, dict):
        return model
    model = dict(model)
    for part in PART_FOLDERS:
        section = model.get(part)
        path = Path(section["path"]) if isinstance(section, dict) and section.get("path") else None
        if path is None:
            continue
        if not path.is_absolute():
            # Inside the checkpoint, unless only the working directory has it (what an old
            # checkpoint of a recipe's relative path meant); a gone part is reported where the
            # checkpoint expected it.
            if (Path(checkpoint) / path).exists() or not path.exists():
                model[part] = {**section, "path": str((Path(checkpoint) / path).resolve())}
        elif not path.exists() and (Path(checkpoint) / part / "config.json").is_file():
            model[part] = {**section, "path": str((Path(checkpoint) / part).resolve())}
    return model


def missing_part(model: dict[str, Any]) -> tuple[str, Path, str] | None:
    """(part, path, what is wrong) for the first part folder a model section (as a dict) names
    that cannot be read: gone, or not a model folder (no config.json); None when all can be."""
    for part in PART_FOLDERS:
        section = model.get(part) if isinstance(model, dict) else None
        if not isinstance(section, dict) or not section.get("path") or str(section.get("name", "")).endswith("random"):
            continue
        path = Path(section["path"])
        if not path.exists():
            return part, path, "does not exist (moved or deleted?)"
        if path.is_dir() and not section.get("gguf_file") and not (path / "config.json").is_file():
            return part, path, "holds no config.json, so it is not a model folder"
    return None


def missing_part_message(where: str, missing: tuple[str, Path, str], checkpoint: Path, meta: dict[str, Any]) -> str:
    """What a checkpoint misses, where it was expected, and what to do: move the folder back, or
    import the model again (the command, with the folder it was imported from when known)."""
    part, path, problem = missing
    folder = path.parent if path.name == part else path
    imported_from = meta.get("imported_from")
    if imported_from:
        todo = f"import the model again: `vlmkit import-hf {imported_from} {folder}`"
    elif folder.resolve() == Path(checkpoint).resolve():
        todo = f"copy the `{part}` folder of the imported checkpoint this one was trained from into {folder}"
    else:
        # Written before checkpoints carried imported parts: it names the import by absolute path.
        todo = f"re-create that folder with `vlmkit import-hf <the Hugging Face folder> {folder}`"
    return (f"{where}: its {PART_FOLDERS[part]} (model.{part}.path) is read from {path}, which {problem}. "
            f"Move the folder back to {path}, or {todo}.")


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
    saved_model = located_parts(json.loads(saved.read_text()).get("model", {}), Path(init_from))
    saved_model.pop("init_from", None)
    merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(saved_model), OmegaConf.create(model)))
    missing = missing_part(merged)
    if missing:
        meta_file = Path(init_from) / "meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        raise ConfigError(missing_part_message(f"model.init_from ({source}): the checkpoint {Path(init_from).resolve()}",
                                               missing, Path(init_from), meta))
    merged["init_from"] = str(Path(init_from).resolve())
    return {**tree, "model": merged}


def _resolve_data_paths(config: Config, recipe_dir: Path, given_on_command_line: Any) -> None:
    cli_stages = ((given_on_command_line or {}).get("train") or {}).get("stages") or {}
    cli_train = (given_on_command_line or {}).get("train") or {}
    data_dir = None
    if config.train.data_dir:
        data_dir = _absolute(config.train.data_dir, Path.cwd() if "data_dir" in cli_train else recipe_dir)
        config.train.data_dir = str(data_dir)
    if config.train.eval is not None:
        on_command_line = isinstance(cli_train.get("eval"), dict) and "data" in cli_train["eval"]
        config.train.eval.data = str(_absolute(config.train.eval.data, data_dir or (Path.cwd() if on_command_line else recipe_dir)))
    for name, stage in config.train.stages.items():
        on_command_line = isinstance(cli_stages.get(name), dict) and "data" in cli_stages[name]
        folder = data_dir or (Path.cwd() if on_command_line else recipe_dir)
        if isinstance(stage.data, str):
            stage.data = str(_absolute(stage.data, folder))
        else:
            for source in stage.data:
                source.path = str(_absolute(source.path, folder))
                if source.image_folder:
                    source.image_folder = str(_absolute(source.image_folder, folder))


def _absolute(path: str, folder: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else folder / p


def dump_config(config: Config) -> dict[str, Any]:
    return config.model_dump(mode="json")
