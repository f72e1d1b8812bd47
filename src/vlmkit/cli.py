"""The `vlmkit` command.

Each area registers its own subcommands from its own module (`register(app)`), so this file
only assembles them.

An exception that escapes a command ends it with one `error: ...` line on stderr and exit
status 1, not a traceback: a bad image, recipe or checkpoint is the user's to fix, and the
message names it. `vlmkit --debug ...` or `VLMKIT_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

import typer
from typer.core import TyperGroup

DEBUG_ENV = "VLMKIT_DEBUG"
# Errors whose message is written for the user (they name the file, record or field).
USER_ERRORS = (ValueError, OSError, ImportError)


def _debug_requested(ctx) -> bool:
    return bool(ctx.params.get("debug")) or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def error_line(exc: BaseException) -> str:
    message = str(exc).strip() or type(exc).__name__
    if isinstance(exc, USER_ERRORS):
        return f"error: {message}"
    return f"error: {type(exc).__name__}: {message} (run with --debug or {DEBUG_ENV}=1 for the traceback)"


def description(command) -> str:
    """A command's whole description for a command listing: its `short_help`, else the first
    paragraph of its help, lines joined."""
    text = command.short_help or (command.help or "").split("\f")[0]
    return " ".join(inspect.cleandoc(text).split("\n\n")[0].split())


class FullHelpGroup(TyperGroup):
    """Lists each subcommand with its whole description, wrapped: click cuts it at the first
    sentence or at the terminal width with "..."."""

    def format_commands(self, ctx, formatter) -> None:
        rows = [(name, description(cmd)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class _CleanErrors(FullHelpGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort):
            raise  # usage errors and deliberate exits keep click's handling
        except Exception as exc:
            if _debug_requested(ctx):
                raise
            typer.echo(error_line(exc), err=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    name="vlmkit",
    help="Build, train, evaluate and serve vision-language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=_CleanErrors,
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
    debug: bool = typer.Option(False, "--debug", help=f"Show the full traceback of an error (also {DEBUG_ENV}=1)."),
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
# Command groups (eval, data) list their subcommands in full too, unless they chose a class.
for _group in app.registered_groups:
    if _group.typer_instance is not None and not isinstance(_group.typer_instance.info.cls, type):
        _group.typer_instance.info.cls = FullHelpGroup


def main() -> None:
    from vlmkit.utils import quiet_third_party_loggers

    quiet_third_party_loggers()
    app()


if __name__ == "__main__":
    sys.exit(main())
