"""The metrics of `metrics.jsonl`, sent on to the logging libraries people already use
(`train.report_to`): TensorBoard, Weights & Biases, trackio.

The loop logs each record once, to a `MetricsLog`: it writes the JSONL line, then hands the
record's numbers to every reporter the recipe names. A reporter is one class registered under the
library's name in `REPORTERS`; it turns a record into that library's own logging calls. The loop
never names a library, and the libraries are imported only when a recipe asks for them.

Every numeric field of a record is sent, under `<stage>/<field>` (`sft/loss`, `sft/lr`,
`sft/tokens_per_s`); held-out results go under `<stage>/heldout/` (`sft/heldout/overall`,
`sft/heldout/breakdown/<kind>`); nested dicts (source shares) are flattened with `/`. The step
is the stage's own optimizer step, as in `metrics.jsonl`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from vlmkit.config import Config, ConfigError
from vlmkit.registry import Registry
from vlmkit.utils import JsonlLogger


class Reporter:
    """One library's logging for one run. Subclasses name the module to import and the pip
    package that provides it, and are registered in REPORTERS under the name a recipe uses."""

    module: str = ""
    pip: str = ""

    def __init__(self, config: Config, output_dir: Path):
        self.config = config
        self.output_dir = output_dir

    def log(self, stage: str, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


REPORTERS: Registry[type[Reporter]] = Registry("reporter")


def _run_name(output_dir: Path) -> str:
    return output_dir.resolve().name


@REPORTERS.register("tensorboard")
class TensorBoardReporter(Reporter):
    """Event files in `<output_dir>/tensorboard` (`tensorboard --logdir <output_dir>/tensorboard`)."""

    module = pip = "tensorboard"

    def __init__(self, config: Config, output_dir: Path):
        super().__init__(config, output_dir)
        # Optional dependency: torch's writer needs the tensorboard package.
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), flush_secs=30)

    def log(self, stage: str, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(f"{stage}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


class _StepPerStage(Reporter):
    """For libraries with one step counter per run that must only grow: each stage's step is sent
    as its own metric, `<stage>/step`, since every stage counts its steps from 1."""

    def log(self, stage: str, step: int, scalars: dict[str, float]) -> None:
        self._log({**{f"{stage}/{k}": v for k, v in scalars.items()}, f"{stage}/step": step}, stage)

    def _log(self, values: dict[str, float], stage: str) -> None:
        raise NotImplementedError


@REPORTERS.register("wandb")
class WandbReporter(_StepPerStage):
    """A Weights & Biases run, offline unless WANDB_MODE says otherwise (`wandb sync` uploads it
    later); its files go to `<output_dir>/wandb`. The project is WANDB_PROJECT, else `vlmkit`."""

    module = pip = "wandb"

    def __init__(self, config: Config, output_dir: Path):
        super().__init__(config, output_dir)
        # Optional dependency, imported only when a recipe reports to wandb.
        import wandb

        self.stages: set[str] = set()
        # Offline by default: a first run needs no account and sends nothing anywhere.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "vlmkit"), name=_run_name(output_dir),
                              dir=str(output_dir), mode=os.environ.get("WANDB_MODE", "offline"),
                              config=config.model_dump(mode="json"))

    def _log(self, values: dict[str, float], stage: str) -> None:
        if stage not in self.stages:
            self.stages.add(stage)
            # The stage's charts use its own step as their x axis.
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
        self.run.log(values)

    def close(self) -> None:
        self.run.finish()


@REPORTERS.register("trackio")
class TrackioReporter(_StepPerStage):
    """A trackio run in the project `vlmkit` (stored locally; `trackio show` opens the dashboard)."""

    module = pip = "trackio"

    def __init__(self, config: Config, output_dir: Path):
        super().__init__(config, output_dir)
        # Optional dependency, imported only when a recipe reports to trackio.
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project="vlmkit", name=_run_name(output_dir), config=config.model_dump(mode="json"))

    def _log(self, values: dict[str, float], stage: str) -> None:
        self.trackio.log(values)

    def close(self) -> None:
        self.trackio.finish()


def check_installed(names: list[str]) -> None:
    """Refuse, before any work, a reporter whose library is not installed, with the command that installs it."""
    for name in names:
        reporter = REPORTERS.get(name)
        if importlib.util.find_spec(reporter.module) is None:
            extra = "  (or pip install 'vlmkit[report]')" if name == "tensorboard" else ""
            raise ConfigError(f"train.report_to: {name} is not installed in this Python environment; "
                              f"install it with: pip install {reporter.pip}{extra}")


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record's numbers, by name: held-out results under `heldout/`, nested dicts
    flattened with `/`; the stage, step and text fields are left out."""
    prefix = "heldout/" if record.get("event") == "eval" else ""
    out: dict[str, float] = {}

    def add(key: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{key}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = float(value)

    for key, value in record.items():
        if key not in ("stage", "step", "event"):
            add(key, value)
    return out


class MetricsLog(JsonlLogger):
    """`metrics.jsonl`, and every library of `train.report_to`: the loop logs each record here
    once. Records of a stage's step go to the reporters too; the rest (the end-of-stage source
    shares, with no step) stay in the JSONL file."""

    def __init__(self, path: str | Path, config: Config):
        super().__init__(path)
        self.reporters: list[Reporter] = []
        try:
            for name in config.train.report_to:
                self.reporters.append(REPORTERS.get(name)(config, Path(config.train.output_dir)))
        except BaseException:
            self.close()
            raise

    def log(self, record: dict) -> None:
        super().log(record)
        stage, step = record.get("stage"), record.get("step")
        if self.reporters and isinstance(stage, str) and isinstance(step, int):
            values = scalars(record)
            for reporter in self.reporters:
                reporter.log(stage, step, values)

    def close(self) -> None:
        super().close()
        for reporter in self.reporters:
            reporter.close()
        self.reporters = []
