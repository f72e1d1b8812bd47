"""`vlmkit inspect` (what a preset is made of and what an image costs) and `vlmkit ablate`
(one recipe trained per cell of a grid of recipe values and seeds; the sweep is `train/sweep.py`)."""

from __future__ import annotations

import json
from pathlib import Path
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

# The names of `vlmkit.train.sweep.ABLATION_CONNECTORS` (written out: the help must not import torch).
BUNDLE_NAMES = "mlp, linear, pixel-shuffle, pooling, qformer-32, qformer-8, perceiver-64, cross-attn"

def _key_values(words: list[str], option: str) -> dict[str, str]:
    """The KEY=VALUE words of a repeatable option, as written."""
    pairs = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{word!r}: expected KEY=VALUE", param_hint=option)
        pairs[key] = value
    return pairs


def _sizes(words: list[str]) -> dict:
    from vlmkit.config import read_yaml

    return {key: read_yaml(value, f"--data-size {key}={value}") for key, value in _key_values(words, "--data-size").items()}


def ablate_command(
    recipe: str = typer.Argument(None, metavar="RECIPE", show_default=False,
                                 help="recipe YAML (default: the quickstart's, embed-align then instruct)"),
    overrides: Optional[list[str]] = typer.Argument(
        None, show_default=False, metavar="KEY=VALUE", help="Dotted recipe overrides every cell gets, e.g. train.stages.instruct.max_steps=100."),
    vary: Optional[list[str]] = typer.Option(None, "--vary", metavar="KEY=v1,v2,...", show_default=False,
                                             help="a recipe key and its values (YAML scalars), crossed with every other --vary; "
                                                  "`connector=...` names connector bundles"),
    connectors: Optional[str] = typer.Option(None, "--connectors", show_default=False,
                                             help=f"shorthand for --vary connector=...; bundles: {BUNDLE_NAMES}"),
    seeds: str = typer.Option("0", "--seeds", help="training seeds, comma-separated: one run per cell and seed"),
    data: str = typer.Option("quickstart", "--data", help="generated dataset (vlmkit.registry.SYNTHETIC_DATA), built once into OUT/data"),
    data_size: Optional[list[str]] = typer.Option(None, "--data-size", metavar="KEY=VALUE", show_default=False,
                                                  help="a size the dataset's builder takes, e.g. n_test=60 (repeatable)"),
    out: str = typer.Option("runs/ablate", "--out", help="sweep folder (sweep.json, data, cells/, ablation.md/.json/.jsonl, plot)"),
    jobs: int = typer.Option(1, "--jobs", min=1, help="cells trained at once, each in its own process on one thread"),
    baseline: Optional[list[str]] = typer.Option(None, "--baseline", metavar="KEY=VALUE", show_default=False,
                                                 help="the row every other row is compared with, item by item (repeatable; "
                                                      "default: the first value of each --vary)"),
    as_json: bool = typer.Option(False, "--json", help="print ablation.json instead of the table"),
) -> None:
    """Train one recipe once per cell of a grid of recipe values (crossed) and seeds, score each on
    the same generated held-out questions, and write accuracy per question kind with 95% bootstrap
    intervals (seeds pooled), visual tokens, prefill FLOPs, trainable parameters and training time, and
    each row's paired difference from the baseline row, to OUT/ablation.md, OUT/ablation.json and
    OUT/accuracy_vs_tokens.png. A rerun into OUT trains only the
    cells not yet done (a killed cell resumes from its stage checkpoints)."""
    from vlmkit.commands.core import overrides_argument, recipe_errors
    from vlmkit.paths import offline
    from vlmkit.train.sweep import BUNDLE_KEY, SweepDefinition, SweepError, parse_vary, run_sweep

    offline()
    words = list(vary or [])
    if connectors:
        words.append(f"{BUNDLE_KEY}={connectors}")
    try:
        axes = [parse_vary(w) for w in words]
        if len({a.key for a in axes}) < len(axes):
            raise SweepError("a key is given to --vary (or --connectors) twice")
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError as e:
        typer.echo(f"error: {e}" if isinstance(e, SweepError) else f"error: --seeds {seeds!r}: expected integers like 0,1,2", err=True)
        raise typer.Exit(2) from None
    if recipe is None or ("=" in recipe and not Path(recipe).exists()):
        # No recipe named: the first word is already an override.
        from vlmkit.quickstart import default_recipe

        overrides = [recipe, *(overrides or [])] if recipe else overrides
        recipe = str(default_recipe())
    chosen = _key_values(list(baseline or []), "--baseline")
    definition = SweepDefinition(str(Path(recipe).resolve()), overrides_argument(overrides), axes, seed_list or [0], data,
                                 _sizes(list(data_size or [])))
    with recipe_errors():
        try:
            report = run_sweep(definition, out, jobs=jobs, baseline=chosen)
        except SweepError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo((Path(out) / "ablation.md").read_text(), nl=False)
        typer.echo(f"wrote {Path(out) / 'ablation.md'}, {Path(out) / 'ablation.json'}, {Path(out) / 'accuracy_vs_tokens.png'}")


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
