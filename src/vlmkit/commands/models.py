"""`vlmkit inspect` (what a preset is made of and what an image costs) and `vlmkit ablate`
(the same small recipe trained with each connector)."""

from __future__ import annotations

import json
from typing import Optional


import typer


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _tiny_report(name: str) -> dict:
    import torch

    from vlmkit import presets
    from vlmkit.model.vlm import VisionLanguageModel

    preset = presets.get_preset(name)
    torch.manual_seed(0)
    model = VisionLanguageModel.build(preset.tiny_config(), pretrained=False)
    counts = {p: sum(x.numel() for x in m.parameters()) for p, m in model.parts().items()}
    counts = {p: counts.get(p, 0) for p in presets.PART_ORDER}
    counts["total"] = sum(counts[p] for p in presets.PART_ORDER)
    return {
        "preset": f"{name} (tiny)",
        "fusion": preset.fusion,
        "connector": model.config.connector.name,
        "params": counts,
        "stages": {s: {"parts": parts, "trainable": sum(counts[p] for p in parts)} for s, parts in preset.stages.items()},
        "image": {"image_size": model.config.processor.image_size, "feature_grid": list(model.image_grid),
                  "visual_tokens": model.tokens_per_image,
                  "memory_tokens": model.memory_tokens_per_image},
    }


def inspect_command(
    preset: str = typer.Argument(..., help="preset name or alias, or `list` to print every preset (`vlmkit inspect list`; the same names as `vlmkit tokens`)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    tiny: bool = typer.Option(False, "--tiny", help="the tiny CPU variant, built for real"),
) -> None:
    """Parameters per part, trainable parameters per stage, visual tokens and FLOPs per image.

    Real shapes are built on the meta device: nothing is allocated or downloaded.
    """
    from vlmkit import presets

    if preset == "list":
        typer.echo("\n".join(presets.names()))
        return
    try:
        preset = presets.resolve(preset)
    except KeyError as e:
        typer.echo(e.args[0], err=True)
        raise typer.Exit(2) from None
    report = _tiny_report(preset) if tiny else presets.inspect_preset(preset)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    p = report["params"]
    about = [f"{report['fusion']} fusion", f"connector {report['connector']}"]
    if report.get("family"):
        about.insert(0, report["family"])
    typer.echo(f"{report['preset']}  ({'; '.join(about)})")
    typer.echo("parameters")
    lecture = report.get("lecture_figures", {})
    for part in presets.PART_ORDER:
        extra = f"   lecture: {lecture[part]['name']} = {_fmt(lecture[part]['params'])}" if part in lecture else ""
        typer.echo(f"  {part:<16} {_fmt(p[part]):>9}{extra}")
    typer.echo(f"  {'total':<16} {_fmt(p['total']):>9}")
    pub = report.get("published")
    if pub and pub["total"]:
        typer.echo(f"  published        {_fmt(pub['total']):>9}  ({pub['difference'] * 100:+.2f}%; {pub['source']})")
    elif pub:
        typer.echo(f"  published        {'-':>9}  ({pub['source']})")
    typer.echo("trainable per stage")
    for stage, s in report["stages"].items():
        typer.echo(f"  {stage:<16} {_fmt(s['trainable']):>9}  ({', '.join(s['parts'])})")
    img = report["image"]
    typer.echo(f"per image ({img['image_size']} px, feature grid {img['feature_grid'][0]}x{img['feature_grid'][1]}"
               + (f", {img['tiles']} tiles" if img.get("tiles", 1) > 1 else "") + ")")
    typer.echo(f"  visual tokens in the LLM context  {img['visual_tokens']}")
    if img.get("memory_tokens"):
        typer.echo(f"  cross-attention memory tokens     {img['memory_tokens']}")
    if "flops" in img:
        f = img["flops"]
        typer.echo(f"  forward FLOPs  vision {_fmt(f['vision'])}  connector {_fmt(f['connector'])}  llm {_fmt(f['llm'])}  total {_fmt(f['total'])}")
    if img.get("note"):
        typer.echo(f"  note: {img['note']}")


# ---- ablate ------------------------------------------------------------------------------------

# Each family at a CPU-trainable size. Budgets differ on purpose: that is what is being compared
# (32 Q-Former queries and 64 latents vs every patch, or a quarter of them).
ABLATION_CONNECTORS: dict[str, dict] = {
    "mlp": {"connector": {"name": "mlp", "options": {"input_norm": True}}},
    "linear": {"connector": {"name": "linear", "options": {}}},
    "pixel-shuffle": {"connector": {"name": "pixel-shuffle", "options": {"ratio": 0.5, "norm": "post"}}},
    "pooling": {"connector": {"name": "pooling", "options": {"kernel": 2, "input_norm": True}}},
    "qformer": {"connector": {"name": "qformer", "options": {"num_queries": 32, "hidden_size": 256, "layers": 2, "heads": 4,
                                                             "intermediate_size": 1024, "input_norm": True}}},
    "perceiver": {"connector": {"name": "perceiver", "options": {"latents": 64, "layers": 2, "heads": 4, "head_dim": 64,
                                                                 "width": 256, "input_proj": "linear"}}},
    "cross-attn": {"connector": {"name": "mlp", "options": {"input_norm": True, "cross_attention": {"every": 6}}},
                   "fusion": "cross-attention"},
}


def ablation_config(recipe, name: str, out_dir, data_dir, overrides=()):
    """The recipe with its connector (and fusion) swapped; everything else identical."""
    from pathlib import Path

    from vlmkit.config import load_config

    if name not in ABLATION_CONNECTORS:
        raise typer.BadParameter(f"unknown connector {name!r}; choose from {', '.join(ABLATION_CONNECTORS)}")
    spec = ABLATION_CONNECTORS[name]
    config = load_config(recipe, [f"train.output_dir={Path(out_dir) / name}", *overrides])
    config.model.connector = config.model.connector.model_validate(spec["connector"])
    config.model.fusion = spec.get("fusion", "prefix")
    data = {"align": "stage1.json", "instruct": "stage2.json"}
    for stage_name, stage in config.train.stages.items():
        stage.data = str(Path(data_dir) / data.get(stage_name, Path(stage.data).name))
        if config.model.fusion == "cross-attention" and "connector" in stage.trainable and "cross_attention" not in stage.trainable:
            stage.trainable = [*stage.trainable, "cross_attention"]
    return config


def run_ablation(recipe, connectors: list[str], out_dir, n_caption: int, n_instruct: int, n_test: int, seed: int,
                 overrides=(), tasks=("text", "chart")) -> list[dict]:
    import json
    import time
    from pathlib import Path

    import torch

    from vlmkit.data.synthetic.tasks import generate as generate_data
    from vlmkit.quickstart import answer_questions, summarise
    from vlmkit.train.loop import run_training
    from vlmkit.utils import JsonlLogger

    out = Path(out_dir)
    data_dir = out / "data"
    if not (data_dir / "test.json").is_file():
        generate_data(data_dir, n_caption=n_caption, n_instruct=n_instruct, n_test=n_test, seed=seed)
    test = [r for r in json.loads((data_dir / "test.json").read_text()) if r["task"] in tasks]
    rows = []
    logger = JsonlLogger(out / "ablation.jsonl")
    try:
        for name in connectors:
            config = ablation_config(recipe, name, out, data_dir, [f"train.seed={seed}", *overrides])
            torch.manual_seed(seed)
            started = time.perf_counter()
            model, stages = run_training(config)
            train_seconds = sum(s.seconds for s in stages)
            model.eval()
            scores = summarise(answer_questions(model, test, data_dir, with_image=True, desc=f"eval {name}"))
            parts = {p: sum(x.numel() for x in m.parameters()) for p, m in model.parts().items()}
            row = {
                "connector": name,
                "fusion": config.model.fusion,
                "accuracy": {t: scores.get(t) for t in tasks},
                "visual_tokens": model.tokens_per_image,
                "memory_tokens": model.memory_tokens_per_image,
                "connector_params": parts["connector"] + parts.get("cross_attention", 0),
                "total_params": sum(parts.values()),
                "train_seconds": round(train_seconds, 1),
                "wall_seconds": round(time.perf_counter() - started, 1),
            }
            logger.log({"event": "ablation", **row})
            rows.append(row)
            del model
    finally:
        logger.close()
    (out / "ablation.md").write_text(ablation_table(rows, tasks) + "\n")
    return rows


def ablation_table(rows: list[dict], tasks=("text", "chart")) -> str:
    head = "| connector | fusion | " + " | ".join(f"{t} acc" for t in tasks) + " | visual tokens (context / memory) | connector params | total params | train s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        accs = " | ".join("-" if r["accuracy"][t] is None else f"{r['accuracy'][t]:.1%}" for t in tasks)
        tokens = f"{r['visual_tokens']} / {r['memory_tokens']}" if r["memory_tokens"] else str(r["visual_tokens"])
        lines.append(f"| {r['connector']} | {r['fusion']} | {accs} | {tokens} | {_fmt(r['connector_params'])} | {_fmt(r['total_params'])} | {r['train_seconds']} |")
    return "\n".join(lines)


def ablate_command(
    recipe: str = typer.Argument(..., metavar="RECIPE", help="recipe YAML (e.g. recipes/ablate.yaml)"),
    overrides: Optional[list[str]] = typer.Argument(
        None, show_default=False, metavar="KEY=VALUE", help="Dotted recipe overrides KEY=VALUE, e.g. train.stages.instruct.max_steps=100."),
    connectors: str = typer.Option("mlp,pixel-shuffle,qformer,perceiver,cross-attn", "--connectors",
                                   help=f"comma-separated connectors to compare, from: {', '.join(ABLATION_CONNECTORS)}"),
    out: str = typer.Option("runs/ablate", "--out", help="output folder (data, one run per connector, ablation.md)"),
    n_caption: int = typer.Option(320, "--n-caption", min=1, help="synthetic caption samples (stage 1)"),
    n_instruct: int = typer.Option(900, "--n-instruct", min=1, help="synthetic question samples (stage 2)"),
    n_test: int = typer.Option(150, "--n-test", min=1, help="held-out questions"),
    seed: int = typer.Option(0, "--seed", help="seed for the data and for training"),
    as_json: bool = typer.Option(False, "--json", help="print the rows as JSON instead of a table"),
) -> None:
    """Train the same recipe once per connector on the synthetic OCR and chart tasks; write a
    comparison table (accuracy per task, visual tokens, parameters, training time) to OUT/ablation.md."""
    names = [c.strip() for c in connectors.split(",") if c.strip()]
    for name in names:
        if name not in ABLATION_CONNECTORS:
            raise typer.BadParameter(f"unknown connector {name!r}; choose from {', '.join(ABLATION_CONNECTORS)}")
    from vlmkit.commands.core import overrides_argument, recipe_errors

    with recipe_errors():
        rows = run_ablation(recipe, names, out, n_caption, n_instruct, n_test, seed, overrides_argument(overrides))
    typer.echo(json.dumps(rows, indent=2) if as_json else ablation_table(rows))


def families_command(
    as_json: bool = typer.Option(False, "--json", help="print the families as JSON"),
) -> None:
    """The model families (one folder each under vlmkit/families): the lecture's pattern each
    follows, its image processors, presets, the Hugging Face model types import-hf reads, and
    its training recipe."""
    # Imported here, not at the top: it pulls in torch, which `vlmkit --help` would otherwise pay for.
    from vlmkit.families import family_specs

    rows = [{"name": spec.name, "title": spec.title, "pattern": spec.pattern, "image_processors": list(spec.image_processors),
             "presets": [entry["name"] for entry in spec.presets],
             "hf_model_types": [t for hf in spec.hf for t in hf.model_types], "recipe": spec.recipe}
            for spec in family_specs()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(f"{row['name']:<16} {row['title']}: {row['pattern']}")
        details = [("processors", row["image_processors"]), ("presets", row["presets"]), ("import-hf", row["hf_model_types"])]
        for label, values in details:
            if values:
                typer.echo(f"{'':<16}   {label}: {', '.join(values)}")
        if row["recipe"]:
            typer.echo(f"{'':<16}   recipe: {row['recipe']}")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)
    app.command("ablate")(ablate_command)
    app.command("families")(families_command)
