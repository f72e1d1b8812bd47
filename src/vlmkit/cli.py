"""The `vlmkit` command.

Each area registers its own subcommands from its own module (`register(app)`), so this file
only assembles them.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="vlmkit",
    help="Build, train, evaluate and serve vision-language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain help: the rich layout printed a type column with "<bool>" against every flag.
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from vlmkit import __version__

        typer.echo(f"vlmkit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version, help="Print the version and exit."),
) -> None:
    """Build, train, evaluate and serve vision-language models."""

# Modules that add subcommands; each defines `register(app: typer.Typer) -> None`.
COMMAND_MODULES = (
    "vlmkit.commands.core",  # quickstart, train, chat
    "vlmkit.commands.recipe",  # recipe (reference, template, check)
    "vlmkit.commands.tokens",  # tokens (token budget)
    "vlmkit.commands.models",  # inspect, ablate
    "vlmkit.commands.evaluate",  # eval ..., data synth-bench
    "vlmkit.commands.serve",  # serve, export-hf, import-hf
)

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
