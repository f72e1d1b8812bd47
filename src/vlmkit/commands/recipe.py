"""`vlmkit recipe`: the recipe reference, a template to start from, and a check of a recipe and
its data that loads no model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def recipe_command(
    schema: Annotated[bool, typer.Option("--schema", help="Print every recipe key with its type, default and meaning (Markdown).")] = False,
    template: Annotated[Optional[Path], typer.Option(help="Write a commented recipe for training on your own LLaVA-format data to this file.", show_default=False)] = None,
    check: Annotated[Optional[Path], typer.Option(help="Validate this recipe and read all its data and image paths, without loading a model.", show_default=False)] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="With --check: dotted overrides KEY=VALUE, as for `vlmkit train`.", show_default=False, metavar="KEY=VALUE")] = None,
    no_guard: Annotated[bool, typer.Option("--no-guard", help="With --check: no stage-boundary warning (as train.stage_guard=false).")] = False,
) -> None:
    """Recipe reference (--schema), a template (--template FILE), or a check (--check RECIPE)."""
    if sum([schema, template is not None, check is not None]) != 1:
        raise typer.BadParameter("give one of --schema, --template FILE, --check RECIPE")
    if schema:
        from vlmkit.recipe_reference import reference_markdown

        typer.echo(reference_markdown(), nl=False)
    elif template is not None:
        from vlmkit.recipe_reference import template_path

        if template.exists():
            raise typer.BadParameter(f"{template} exists; choose a new file name", param_hint="--template")
        template.parent.mkdir(parents=True, exist_ok=True)
        template.write_text(template_path().read_text())
        typer.echo(f"wrote {template}: put train.json, test.json (held-out) and their images next to it, "
                   f"then `vlmkit recipe --check {template}`")
    else:
        from vlmkit.commands.core import overrides_argument
        from vlmkit.config import ConfigError, load_config
        from vlmkit.train.preflight import DataError, check_data, check_heldout, check_model, stage_guard_warnings
        from vlmkit.train.reporting import check_installed

        try:
            config = load_config(check, [*overrides_argument(overrides), *(["train.stage_guard=false"] if no_guard else [])])
            check_model(config)
            report = check_data(config)
            heldout = check_heldout(config)
            check_installed(config.train.report_to)
        except (ConfigError, DataError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        for name, data in report.items():
            skipped = f", {data.unusable} to be skipped" if data.unusable else ""
            typer.echo(f"stage {name}: {data.records} records{skipped} in {data.path}")
        if heldout is not None:
            typer.echo(f"train.eval: {heldout} held-out items ({config.train.eval.benchmark}) in {config.train.eval.data}")
        for warning in stage_guard_warnings(config, report):
            typer.echo(f"warning: {warning}", err=True)
        typer.echo(f"{check}: recipe and data are valid")


def register(app: typer.Typer) -> None:
    app.command("recipe")(recipe_command)
