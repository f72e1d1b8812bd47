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
                  "memory_tokens": getattr(model, "memory_tokens_per_image", 0)},
    }


def inspect_command(
    preset: str = typer.Argument(..., help="preset name (see `vlmkit inspect --list`)"),
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
    if preset not in presets.names():
        typer.echo(f"unknown preset {preset!r}; known: {', '.join(presets.names())}", err=True)
        raise typer.Exit(2)
    report = _tiny_report(preset) if tiny else presets.inspect_preset(preset)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    p = report["params"]
    typer.echo(f"{report['preset']}  ({report.get('family', '')}; {report['fusion']} fusion, connector {report['connector']})")
    typer.echo("parameters")
    seed = report.get("seed_figures", {})
    for part in presets.PART_ORDER:
        extra = f"   seed: {seed[part]['name']} = {_fmt(seed[part]['params'])}" if part in seed else ""
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


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)
    try:
        from vlmkit.commands.ablate import ablate_command
    except ImportError:
        return
    app.command("ablate")(ablate_command)
