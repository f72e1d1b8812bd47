"""Checks that run before any model is built: every stage's data file is read, every record
parsed and every image and video path looked up, so a typo costs a second, not a model load.

The digest of each data file is kept in the stage's checkpoint; a later run compares it, so a
changed file is noticed even when its path is the same.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from vlmkit.config import Config, ConfigError, StageGuardConfig
from vlmkit.data.formats import BadRecordError
from vlmkit.data.sources import DataSourceError, Mixture, open_source
from vlmkit.eval.benchmarks import EvalInputError, get_benchmark
from vlmkit.registry import CONNECTORS, IMAGE_PROCESSORS, LANGUAGE_MODELS, VISION_TOWERS

# How many missing files an error lists before it summarises the rest.
SHOWN = 5


class DataError(BadRecordError):
    """A stage's data that cannot be used; the message names the stage, the file and the record.
    A BadRecordError, so code that handles bad records handles these too."""

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.record_id, self.reason = None, message


@dataclass
class StageData:
    path: Path | str  # the data file, or the mixture's sources as text
    records: int
    sha256: str
    unusable: int = 0  # records that `on_bad_record: skip` will leave out
    mixture: object = None  # the indexed sources (`vlmkit.data.sources.Mixture`)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_model(config: Config) -> None:
    """The model section's names exist and the connector's options validate, before anything is
    loaded (they are otherwise checked only as each part is built, after the vision tower)."""
    import difflib

    m = config.model
    for key, registry, name in (("model.vision.name", VISION_TOWERS, m.vision.name), ("model.connector.name", CONNECTORS, m.connector.name),
                                ("model.llm.name", LANGUAGE_MODELS, m.llm.name), ("model.processor.name", IMAGE_PROCESSORS, m.processor.name)):
        if name not in registry:
            close = difflib.get_close_matches(name, registry.names(), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{key}: unknown {registry.kind} {name!r}; {hint}known: {', '.join(registry.names())}")
    from pydantic import ValidationError

    options = CONNECTORS.get(m.connector.name).Options
    given = dict(m.connector.options)
    if m.fusion == "cross-attention":
        # The blocks' settings ride along in the connector's options; the fusion takes them out.
        from vlmkit.model.cross_attention import parse_cross_attention_options

        try:
            parse_cross_attention_options(given.pop("cross_attention", None))
        except ValueError as e:
            raise ConfigError(f"model.connector.options.cross_attention: {e}") from None
    try:
        options.model_validate(given)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = "model.connector.options." + ".".join(map(str, err["loc"]))
            message = err["msg"]
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(str(err["loc"][-1]), list(options.model_fields), n=1, cutoff=0.6)
                message = "unknown option" + (f"; did you mean {close[0]!r}?" if close else f"; options of {m.connector.name!r}: "
                                              + ", ".join(options.model_fields))
            problems.append(f"  {where}: {message}")
        raise ConfigError(f"invalid connector options for {m.connector.name!r}:\n" + "\n".join(problems)) from None


# The lecture's rule the stage-boundary guard names, and what the stage-boundary experiment measured.
STAGE_GUARD_RULE = ("fine-tuning the image encoder before the projection has converged is one of the most common "
                    "causes of poor downstream performance")
STAGE_GUARD_EFFECT = ("measured on a CPU budget in docs/lecture-claims.md, two seeds: at the same steps, unfreezing the "
                      "tower only after the projector's stage read 5.5% of the held-out words against 4.5%, +1 point "
                      "with a 95% interval of -3.5 to +5.5, so that budget shows no effect either way")
GUARDED_PARTS = ("vision", "llm")


class StageGuardWarning(UserWarning):
    """A stage trains the vision tower or the LLM before the connector has converged."""


def pretrained_parts(config: Config) -> set[str]:
    """The guarded parts whose weights come from files, as `VisionLanguageModel.build` marks them
    (a `...random` name, or a tower that declares `from_files = False`, starts random), read without
    loading anything: the tower is built on the meta device. A tower that cannot be built here
    counts as pretrained."""
    import torch

    from vlmkit.model.vision import build_vision_tower

    parts = set() if config.model.llm.name.endswith("random") else {"llm"}
    if not config.model.vision.name.endswith("random"):
        try:
            with torch.device("meta"):
                from_files = getattr(build_vision_tower(config.model.vision, pretrained=False), "from_files", True)
        except Exception:  # noqa: BLE001 - the build itself reports its errors; the guard only asks
            from_files = True
        if from_files:
            parts.add("vision")
    return parts


def stage_guard_warnings(config: Config, data: dict[str, StageData] | None = None, pretrained: set[str] | None = None) -> list[str]:
    """One warning per stage that trains the pretrained vision tower or LLM while the connector has
    had fewer than `train.stage_guard.min_connector_steps` steps in earlier stages; none when the
    guard is off or the model starts from a checkpoint (`model.init_from`: its connector was
    trained). A part built with random weights has nothing to protect (`pretrained`: the parts
    that are not; default `pretrained_parts(config)`). A stage sized in epochs counts its steps
    from `data` (a stage it cannot size counts as enough)."""
    guard = config.train.stage_guard
    if guard is False or config.model.init_from:
        return []
    minimum = guard.min_connector_steps if not isinstance(guard, bool) else StageGuardConfig().min_connector_steps
    guarded = [p for p in GUARDED_PARTS if any(p in s.trainable for s in config.train.stages.values())]
    if not guarded:
        return []
    pretrained = pretrained_parts(config) if pretrained is None else pretrained
    trained, warnings = 0, []
    for name, stage in config.train.stages.items():
        steps = _stage_steps(stage, data.get(name) if data else None)
        unfrozen = [p for p in GUARDED_PARTS if p in stage.trainable and p in pretrained]
        if unfrozen and trained < minimum:
            parts = " and ".join("the vision tower" if p == "vision" else "the LLM" for p in unfrozen)
            warnings.append(
                f"stage {name!r} trains {parts} while the connector has trained {trained} step(s) in earlier stages "
                f"(fewer than train.stage_guard.min_connector_steps={minimum}). The lecture's rule: {STAGE_GUARD_RULE} "
                f"({STAGE_GUARD_EFFECT}). Train the connector alone first, or silence this with --no-guard or "
                "train.stage_guard: false.")
        if "connector" in stage.trainable:
            trained += steps if steps is not None else minimum
    return warnings


def _stage_steps(stage, data: StageData | None) -> int | None:
    if stage.max_steps is not None:
        return stage.max_steps
    if data is None:
        return None
    import math

    return math.ceil(data.records * stage.epochs / (stage.batch_size * stage.grad_accum))


def check_data(config: Config) -> dict[str, StageData]:
    """Every stage's data, checked; raises `DataError` on the first stage that cannot be trained."""
    if not config.train.stages:
        # A run that trains nothing must not look like one that succeeded.
        raise DataError("the recipe has no train.stages: nothing to train")
    return {name: check_stage_data(name, stage, config.train.on_bad_record, config.train.max_skip_fraction)
            for name, stage in config.train.stages.items()}


def check_heldout(config: Config) -> int | None:
    """`train.eval`'s items, read as the held-out checks will read them (the benchmark named, its
    file or folder, every record scorable), so a bad held-out file stops the run before the
    first stage, not after it; returns how many items it has (None without `train.eval`)."""
    if config.train.eval is None:
        return None
    try:
        return len(get_benchmark(config.train.eval.benchmark).load(config.train.eval.data))
    except EvalInputError as e:
        raise DataError(f"train.eval ({config.train.eval.benchmark}): {e}") from None


def check_stage_data(name: str, stage, on_bad_record: str = "error", max_skip_fraction: float = 1.0) -> StageData:
    """Index every source of the stage (one pass over the records, no image decoded) and look up
    every image file; records that cannot be used are listed (error) or counted (skip: refused
    when they are more than `max_skip_fraction` of the stage's records)."""
    configured = stage.sources()
    opened = []
    for cfg in configured:
        path = Path(cfg.path)
        if not path.exists() or (path.is_dir() and isinstance(stage.data, str) and cfg.format in ("auto", "llava")
                                 and not _shard_folder(path)):
            where = "is a folder, not a file" if path.is_dir() else "not found"
            raise DataError(f"stage {name!r}: data file {where}: {path.resolve()}\n(a relative `data` path in a recipe is relative "
                            "to the recipe's folder, on the command line to the working directory; train.data_dir=FOLDER sets the folder)")
        try:
            source = open_source(path, cfg.format, cfg.image_folder, kind=stage.loss, allow_empty=True,
                                 streaming=cfg.streaming, shuffle_buffer=cfg.shuffle_buffer, llamafactory=cfg.llamafactory)
        except (DataSourceError, OSError, ValueError) as e:  # BadRecordError and bad JSON are ValueErrors
            raise DataError(f"stage {name!r}: {e}") from None
        bad = [b for b in source.bad if not b.missing_files]
        missing = [b for b in source.bad if b.missing_files]
        total = len(source) + len(source.bad)
        if not total:
            raise DataError(f"stage {name!r}: {path.resolve()} holds no records (empty source)")
        if on_bad_record == "error" and source.bad:
            lines = [b.message for b in bad + missing]
            head = (f"stage {name!r}: {len(missing)} record(s) of {path.resolve()} name files that do not exist"
                    if missing and not bad else f"stage {name!r}: {len(lines)} unusable record(s) in {path.resolve()}")
            more = f"\n  ... and {len(lines) - SHOWN} more" if len(lines) > SHOWN else ""
            raise DataError(head + ":\n  " + "\n  ".join(lines[:SHOWN]) + more
                            + "\n(set train.on_bad_record=skip to train without them)")
        if not len(source):
            raise DataError(f"stage {name!r}: none of the {total} records of {path.resolve()} is usable, e.g. {source.bad[0].message}")
        opened.append(source)
    mixture = Mixture(opened, [c.weight for c in configured], [c.path for c in configured])
    if isinstance(stage.data, str) and len(opened[0].files()) == 1:
        digest = file_digest(opened[0].files()[0])  # as before mixtures: a plain file's digest
    else:
        h = hashlib.sha256()
        for cfg, source in zip(configured, opened):
            h.update(f"{cfg.weight!r} {cfg.format}".encode())
            for f in source.files():
                h.update(file_digest(f).encode())
        digest = h.hexdigest()
    path = Path(stage.data) if isinstance(stage.data, str) else stage.data_names()
    data = StageData(path, sum(len(s) + len(s.bad) for s in opened), digest, sum(len(s.bad) for s in opened), mixture)
    check_skip_rate(name, data, max_skip_fraction)
    return data


def check_skip_rate(name: str, data: StageData, max_skip_fraction: float, encode_skipped: int = 0,
                    example: str | None = None) -> None:
    """Refuse a stage that leaves out more than `max_skip_fraction` of its records: those ruled out
    while indexing plus `encode_skipped` distinct records found unusable while encoding so far
    (`example`: one of their messages). Training checks after every step that skipped, so a stage
    of bad records stops at once, and one with no usable record always stops."""
    left_out = data.unusable + encode_skipped
    if not left_out or (left_out <= max_skip_fraction * data.records and left_out < data.records):
        return
    if example is None:
        example = next(b.message for s in data.mixture.sources for b in s.bad)
    if left_out >= data.records:
        raise DataError(f"stage {name!r}: none of the {data.records} record(s) of {data.path} is usable, e.g. {example}")
    raise DataError(f"stage {name!r}: {left_out} of the {data.records} records of {data.path} are unusable "
                    f"({left_out / data.records:.1%}), more than train.max_skip_fraction={max_skip_fraction:g} allows, "
                    f"e.g. {example}\n(fix the records, or raise train.max_skip_fraction to train without them)")


def nothing_trained(name: str, data: StageData, steps: int, example: str | None) -> DataError:
    """The error for a stage whose steps met no usable record: it trained nothing, and is not saved as trained."""
    return DataError(f"stage {name!r}: every record drawn from {data.path} in {steps} step(s) was unusable, so nothing "
                    f"was trained{f', e.g. {example}' if example else ''}")


def _shard_folder(path: Path) -> bool:
    return any(p.suffix in (".parquet", ".tar", ".arrow") for p in path.iterdir())


def _files_of(item) -> list[Path]:
    """The image and video files a sample or preference pair reads (inline images are bytes)."""
    return [p for p in [*item.images, *item.videos] if isinstance(p, Path)]
