"""`vlmkit ablate`: one recipe trained once per cell of a grid (the values of some recipe keys,
crossed, times the training seeds), each cell scored on the same generated held-out questions.

A sweep lives in one folder: `sweep.json` (its definition), `data/` (generated once),
`cells/<name>/` (each cell's training run and, once trained and scored, its `cell.json`),
`ablation.jsonl` (one line per finished cell) and the reports `sweep_report.py` writes. A cell's
folder name comes from its values and seed, so a rerun finds the cells already done and trains only
the others; a cell killed while training resumes through its stage checkpoints.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmkit.config import Config, ConfigError, dump_config, load_config, read_yaml
from vlmkit.utils import JsonlLogger, atomic_write_text, replace_folder

# The pseudo-key of named connector bundles (`--vary connector=mlp,qformer-32`, `--connectors`).
BUNDLE_KEY = "connector"

# Named connectors at a CPU-trainable size for the quickstart's 8x8 EfficientNet grid (64
# features at 256 px). Token budgets differ on purpose, that is what is compared: every patch
# (mlp, 64), 2x2 pixel shuffle and 2x2 average pooling (16 each), 32 and 8 Q-Former queries,
# 64 Perceiver latents, and cross-attention blocks reading the 64 MLP-projected patches. A bundle
# sets the connector's name and options and the fusion; the recipe's `output_norm` stays.
ABLATION_CONNECTORS: dict[str, dict] = {
    "mlp": {"connector": {"name": "mlp", "options": {"input_norm": True}}},
    "linear": {"connector": {"name": "linear", "options": {}}},
    "pixel-shuffle": {"connector": {"name": "pixel-shuffle", "options": {"ratio": 0.5, "norm": "post", "projector": "mlp"}}},
    "pooling": {"connector": {"name": "pooling", "options": {"kernel": 2, "input_norm": True}}},
    "qformer-32": {"connector": {"name": "qformer", "options": {"num_queries": 32, "hidden_size": 256, "layers": 2, "heads": 4,
                                                                "intermediate_size": 1024, "input_norm": True}}},
    "qformer-8": {"connector": {"name": "qformer", "options": {"num_queries": 8, "hidden_size": 256, "layers": 2, "heads": 4,
                                                               "intermediate_size": 1024, "input_norm": True}}},
    "perceiver-64": {"connector": {"name": "perceiver", "options": {"latents": 64, "layers": 2, "heads": 4, "head_dim": 64,
                                                                    "width": 256, "input_proj": "linear"}}},
    "cross-attn": {"connector": {"name": "mlp", "options": {"input_norm": True, "cross_attention": {"every": 6}}},
                   "fusion": "cross-attention"},
}
# Earlier names of two bundles.
BUNDLE_ALIASES = {"qformer": "qformer-32", "perceiver": "perceiver-64"}
DEFAULT_CONNECTORS = "mlp,pixel-shuffle,pooling,qformer-32,qformer-8,perceiver-64,cross-attn"
# Mapping keys whose entries are checked by the part they configure, not by the recipe schema.
FREE_MAPPINGS = ("options", "part_lr", "config")
MAX_NAME = 120
# Keys each cell's recipe gets from the sweep itself.
SET_BY_SWEEP = {"train.seed": "give the seeds with --seeds", "train.output_dir": "DIR/cells/<cell>",
                "train.data_dir": "DIR/data, built by --data"}


class SweepError(ValueError):
    """A sweep that cannot run as given; the message names the key, value or file."""


@dataclass(frozen=True)
class Axis:
    key: str
    texts: tuple[str, ...]  # each value as written: the override text of its cells

    @property
    def values(self) -> list[Any]:
        return [read_yaml(t, f"--vary {self.key}") for t in self.texts]


def parse_vary(text: str) -> Axis:
    """`KEY=v1,v2,...`: the values are YAML scalars; a value that holds a comma cannot be swept here."""
    key, sep, values = text.partition("=")
    texts = tuple(v.strip() for v in values.split(",") if v.strip())
    if not sep or not key.strip() or not texts:
        raise SweepError(f"--vary {text!r}: expected KEY=v1,v2,...")
    if len(set(texts)) < len(texts):
        raise SweepError(f"--vary {text!r}: a value is given twice")
    key = key.strip()
    if key == BUNDLE_KEY:
        texts = tuple(_bundle_name(t) for t in texts)
    return Axis(key, texts)


def _bundle_name(name: str) -> str:
    name = BUNDLE_ALIASES.get(name, name)
    if name not in ABLATION_CONNECTORS:
        close = difflib.get_close_matches(name, list(ABLATION_CONNECTORS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise SweepError(f"--vary {BUNDLE_KEY}: unknown connector bundle {name!r}; {hint}known: {', '.join(ABLATION_CONNECTORS)}")
    return name


@dataclass(frozen=True)
class Cell:
    name: str  # the folder under cells/: its values and seed
    group: str  # the name without the seed: the cells pooled into one row
    values: dict[str, str]
    seed: int


def _folder_name(parts: list[str]) -> str:
    text = "__".join(re.sub(r"[^A-Za-z0-9._=+-]", "-", p) for p in parts) or "base"
    if len(text) > MAX_NAME:
        text = text[:MAX_NAME - 17] + "-" + hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    return text


@dataclass
class SweepDefinition:
    recipe: str
    overrides: list[str] = field(default_factory=list)
    axes: list[Axis] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    data: str = "quickstart"
    data_sizes: dict[str, Any] = field(default_factory=dict)
    data_seed: int = 0

    def recipe_sha256(self) -> str:
        return hashlib.sha256(Path(self.recipe).read_bytes()).hexdigest()

    def to_json(self) -> dict:
        return {"recipe": str(self.recipe), "recipe_sha256": self.recipe_sha256(), "overrides": list(self.overrides),
                "vary": [{"key": a.key, "values": list(a.texts)} for a in self.axes], "seeds": list(self.seeds),
                "data": self.data, "data_sizes": dict(self.data_sizes), "data_seed": self.data_seed}

    def cells(self) -> list[Cell]:
        keys = [a.key for a in self.axes]
        cells = []
        for combo in itertools.product(*(a.texts for a in self.axes)):
            values = dict(zip(keys, combo))
            group = _folder_name([f"{k}={v}" for k, v in values.items()])
            for seed in self.seeds:
                cells.append(Cell(_folder_name([*(f"{k}={v}" for k, v in values.items()), f"seed={seed}"]), group, values, seed))
        names = [c.name for c in cells]
        if len(set(names)) < len(names):
            raise SweepError("two cells of this sweep would share a folder name; give values that differ in letters or digits")
        return cells


def definition_change(old: dict, new: dict) -> str | None:
    """Why the sweep `new` cannot continue in the folder of `old`, or None. A new definition may
    only add cells: more values of the same keys, or more seeds; everything else must be equal."""
    for key in ("recipe_sha256", "overrides", "data", "data_sizes", "data_seed"):
        if old.get(key) != new.get(key):
            what = "the recipe's contents" if key == "recipe_sha256" else key
            return f"{what} differ (before: {old.get(key)!r}, now: {new.get(key)!r})"
    if [a["key"] for a in old["vary"]] != [a["key"] for a in new["vary"]]:
        return f"the varied keys differ (before: {[a['key'] for a in old['vary']]}, now: {[a['key'] for a in new['vary']]})"
    for a, b in zip(old["vary"], new["vary"]):
        dropped = [v for v in a["values"] if v not in b["values"]]
        if dropped:
            return f"--vary {a['key']} leaves out {dropped}, which the sweep there has"
    dropped = [s for s in old["seeds"] if s not in new["seeds"]]
    return f"--seeds leaves out {dropped}, which the sweep there has" if dropped else None


# ---- recipe keys and cell configs ---------------------------------------------------------------

def check_keys(definition: SweepDefinition) -> None:
    """Every varied key names a key of the recipe (its defaults included); a key under a part's
    free-form mapping (`model.connector.options`) is checked when the cell's part is."""
    try:
        tree = dump_config(load_config(definition.recipe, definition.overrides))
    except ConfigError as e:
        raise SweepError(str(e)) from None
    for axis in definition.axes:
        if axis.key == BUNDLE_KEY:
            continue
        if axis.key in SET_BY_SWEEP:
            raise SweepError(f"--vary {axis.key}: the sweep sets it for each cell ({SET_BY_SWEEP[axis.key]})")
        node: Any = tree
        walked: list[str] = []
        for part in axis.key.split("."):
            if isinstance(node, dict) and part in node:
                node, walked = node[part], [*walked, part]
                continue
            if walked and walked[-1] in FREE_MAPPINGS and isinstance(node, dict):
                break
            known = list(node) if isinstance(node, dict) else []
            close = difflib.get_close_matches(part, known, n=1, cutoff=0.6)
            where = ".".join(walked) or "the top level"
            hint = f"did you mean {'.'.join([*walked, close[0]])!r}?" if close else (
                f"known keys at {where}: {', '.join(known)}" if known else f"{where} holds a value, not keys")
            raise SweepError(f"--vary {axis.key}: {definition.recipe} has no key {'.'.join([*walked, part])!r}; {hint}")


def cell_config(definition: SweepDefinition, cell: Cell, out: Path) -> tuple[Config, list[str]]:
    """The cell's recipe: the recipe, its connector bundle, the sweep's overrides, the cell's values
    and seed, its own output folder and the sweep's data; and the stages it leaves out."""
    from vlmkit.train.preflight import check_model

    tree = read_yaml(Path(definition.recipe).read_text(encoding="utf-8"), f"recipe {definition.recipe}") or {}
    bundle = cell.values.get(BUNDLE_KEY)
    if bundle:
        spec = ABLATION_CONNECTORS[bundle]
        model = tree.setdefault("model", {})
        model["connector"] = {**(model.get("connector") or {}), **json.loads(json.dumps(spec["connector"]))}
        model["fusion"] = spec.get("fusion", "prefix")
    out = Path(out).resolve()
    overrides = [f"train.feature_cache_dir={out / 'feature_cache'}", *definition.overrides,
                 *(f"{k}={v}" for k, v in cell.values.items() if k != BUNDLE_KEY),
                 f"train.seed={cell.seed}", f"train.output_dir={out / 'cells' / cell.name}", f"train.data_dir={out / 'data'}"]
    where = f"cell {cell.name}"
    try:
        # Relative stage data paths resolve against `train.data_dir`, the sweep's data.
        config = load_config(tree, overrides)
        dropped = _fit_fusion(config)
        check_model(config)
    except (ConfigError, ValueError) as e:
        raise SweepError(f"{where}: {e}") from None
    return config, dropped


def _fit_fusion(config: Config) -> list[str]:
    """Cross-attention blocks train wherever the connector trains; an embed-align stage, which
    writes into prefix slots, cannot train them and is left out (the cell records it)."""
    if config.model.fusion != "cross-attention":
        return []
    dropped = [n for n, s in config.train.stages.items() if s.loss == "embed-align"]
    if config.train.eval is not None and config.train.eval.stages:
        config.train.eval.stages = [s for s in config.train.eval.stages if s not in dropped] or None
    config.train.stages = {n: s for n, s in config.train.stages.items() if n not in dropped}
    for stage in config.train.stages.values():
        if "connector" in stage.trainable and "cross_attention" not in stage.trainable:
            stage.trainable = [*stage.trainable, "cross_attention"]
    return dropped


# ---- running ----------------------------------------------------------------------------------

# Trains one cell's config and scores it on the held-out records: `(config, test, data_dir) -> dict`.
CellRunner = Callable[[Config, list[dict], Path], dict]


def claim_folder(definition: SweepDefinition, out: Path) -> None:
    """Write `sweep.json`, or check the one there describes this sweep (or one it only adds cells to)."""
    path = out / "sweep.json"
    new = definition.to_json()
    if path.is_file():
        old = json.loads(path.read_text())
        why = definition_change(old, new)
        if why:
            raise SweepError(f"{out} holds another sweep: {why}. Give a new --out, or rerun the sweep stored in {path}")
    elif out.is_dir() and any(out.iterdir()):
        # data/, cells/ and the reports would land among (and over) files the user keeps there.
        raise SweepError(f"{out} is not empty and holds no sweep.json: give a new or empty --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(new, indent=2) + "\n")


def prepare_data(definition: SweepDefinition, out: Path) -> Path:
    """The sweep's data, generated once into `out/data` (built aside and moved in when complete)."""
    from vlmkit.registry import SYNTHETIC_DATA

    data = out / "data"
    if (data / "test.json").is_file():
        return data
    try:
        builder = SYNTHETIC_DATA.get(definition.data)
    except KeyError as e:
        raise SweepError(f"--data: {e.args[0]}") from None
    partial = out / ".data.partial"
    if partial.exists():
        import shutil

        shutil.rmtree(partial)
    try:
        builder(partial, seed=definition.data_seed, **definition.data_sizes)
    except TypeError as e:
        raise SweepError(f"--data-size for {definition.data!r}: {e}") from None
    replace_folder(partial, data)
    return data


def run_sweep(definition: SweepDefinition, out: str | Path, runner: CellRunner | None = None, progress: bool = True,
              jobs: int = 1, baseline: dict[str, str] | None = None) -> dict:
    """Train and score every cell not yet done (`jobs` at a time, each in its own process on one
    thread), then write the reports, every row compared with the `baseline` row (default: the
    first value of each varied key); returns `ablation.json`'s contents."""
    from vlmkit.train.sweep_report import baseline_values, write_reports

    out = Path(out)
    check_keys(definition)
    try:
        baseline_values(definition.to_json(), baseline)
    except ValueError as e:
        raise SweepError(str(e)) from None
    cells = definition.cells()
    configs = {c.name: cell_config(definition, c, out) for c in cells}  # every cell checked before any trains
    claim_folder(definition, out)
    data = prepare_data(definition, out)
    test = json.loads((data / "test.json").read_text())
    todo = [c for c in cells if not (out / "cells" / c.name / "cell.json").is_file()]
    logger = JsonlLogger(out / "ablation.jsonl")

    def finish(cell: Cell, result: dict) -> None:
        done = out / "cells" / cell.name / "cell.json"
        record = {"name": cell.name, "group": cell.group, "values": cell.values, "seed": cell.seed,
                  "dropped_stages": configs[cell.name][1], **result}
        done.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(done, json.dumps(record, indent=1) + "\n")
        logger.log({"event": "cell", **{k: v for k, v in record.items() if k != "items"}})

    try:
        if jobs > 1 and len(todo) > 1:
            _run_parallel(todo, configs, test, data, runner or functools.partial(train_and_score, progress=False), jobs, finish, progress)
        else:
            _run_serial(todo, len(cells), configs, test, data, runner or train_and_score, finish, progress)
    finally:
        logger.close()
    records = [json.loads((out / "cells" / c.name / "cell.json").read_text()) for c in cells]
    return write_reports(definition.to_json(), records, out, baseline)


def _run_serial(todo, total, configs, test, data, runner, finish, progress) -> None:
    from tqdm.auto import tqdm

    with tqdm(total=total, initial=total - len(todo), desc="sweep cells", unit="cell", disable=not progress) as bar:
        for cell in todo:
            finish(cell, runner(configs[cell.name][0], test, data))
            bar.update()


def _cell_worker_init() -> None:
    import torch

    from vlmkit.utils import die_with_parent, quiet_third_party_loggers

    torch.set_num_threads(1)
    quiet_third_party_loggers()
    # A sweep stopped by a SIGTERM to its own process alone must not leave cells training: the
    # rerun would train them again beside the orphans, in the same folders.
    die_with_parent()


def _run_parallel(todo, configs, test, data, runner, jobs, finish, progress) -> None:
    """Cells in `jobs` spawned processes; each result is written as it arrives, so a failure or a
    kill loses only the cells still running."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm.auto import tqdm

    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_cell_worker_init)
    try:
        running = {pool.submit(runner, configs[c.name][0], test, data): c for c in todo}
        with tqdm(total=len(todo), desc=f"sweep cells ({jobs} at a time)", unit="cell", disable=not progress) as bar:
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    finish(running.pop(future), future.result())
                    bar.update()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def train_and_score(config: Config, test: list[dict], data_dir: Path, progress: bool = True) -> dict:
    """Train the cell's recipe (finished stages are loaded, a stopped one resumes) and answer the
    held-out questions with the image, each scored by the `synth-qa` benchmark's rule."""
    import torch

    from vlmkit.train.loop import run_training

    wall, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(config.train.seed)
    model, stages = run_training(config, progress=progress, on_change="restart")
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu
    model.eval()
    started = time.perf_counter()
    items = answer_items(model, test, data_dir, bf16=config.train.precision == "bf16")
    return {"accuracy": accuracy_by(items, "kind"), "accuracy_by_difficulty": accuracy_by(items, "kind", "difficulty"),
            **cost_of(model, config, test, data_dir),
            "trainable_parameters": max((sum(s.trainable_parameters.values()) for s in stages), default=0),
            "trainable_by_stage": {s.name: sum(s.trainable_parameters.values()) for s in stages},
            "train_seconds": round(sum(s.seconds - s.eval_seconds for s in stages), 2),
            "train_wall_seconds": round(train_wall, 2), "train_cpu_seconds": round(train_cpu, 2),
            "eval_seconds": round(time.perf_counter() - started, 2),
            "stages": [{"name": s.name, "steps": s.steps, "seconds": round(s.seconds, 2), "loaded": s.loaded} for s in stages],
            "items": items}


def answer_items(model, test: list[dict], data_dir: Path, bf16: bool = False, batch_size: int = 16) -> list[dict]:
    """Greedy answers through the backend `vlmkit eval run` uses, one row per held-out record."""
    from vlmkit.data.synthetic.tasks import question_kind
    from vlmkit.eval.backends import VlmkitBackend
    from vlmkit.eval.benchmarks.synth_qa import SyntheticQA, score_answer
    from vlmkit.processing.images import load_image

    backend = VlmkitBackend(model, bf16=bf16)
    items = []
    for start in range(0, len(test), batch_size):
        chunk = test[start : start + batch_size]
        requests = [(_question(r), [load_image(data_dir / r["image"])]) for r in chunk]
        for r, pred in zip(chunk, backend.generate(requests, SyntheticQA.default_max_new_tokens)):
            items.append({"id": str(r["id"]), "kind": question_kind(r), "difficulty": r.get("difficulty"),
                          "correct": float(score_answer(r["task"], pred, str(r["answer"]))), "prediction": pred})
    return items


def _question(record: dict) -> str:
    return record["conversations"][0]["value"].replace("<image>", "").strip()


def accuracy_by(items: list[dict], *fields: str) -> dict[str, float]:
    """Mean score per value of `fields` (joined by `/`), leaving out items without them."""
    groups: dict[str, list[float]] = {}
    for it in items:
        if all(it.get(f) is not None for f in fields):
            groups.setdefault("/".join(str(it[f]) for f in fields), []).append(it["correct"])
    return {k: sum(v) / len(v) for k, v in groups.items()}


def cost_of(model, config: Config, test: list[dict], data_dir: Path) -> dict:
    """Visual tokens of one image, and the FLOPs of one held-out prompt (its image and question,
    in the chat template) by the token-budget code of `vlmkit tokens`."""
    from vlmkit.eval.backends import VlmkitBackend
    from vlmkit.presets.budget import recipe_costing, sequence_flops
    from vlmkit.processing.images import load_image

    image = load_image(data_dir / test[0]["image"])
    prompt = VlmkitBackend(model).encode(_question(test[0]), [image])
    flops = sequence_flops(recipe_costing(config), image.width, image.height, int(prompt.input_ids.numel()),
                           model.memory_tokens_per_image or None)
    return {"visual_tokens": model.tokens_per_image, "memory_tokens": model.memory_tokens_per_image,
            "prompt_tokens": int(prompt.input_ids.numel()), "prefill_flops": flops}
