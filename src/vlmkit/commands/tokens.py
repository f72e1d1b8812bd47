"""Subcommands: placeholder until this area lands."""

import typer


def register(app: typer.Typer) -> None:
    return None
