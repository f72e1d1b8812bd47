"""The `vlmkit` subcommands, one module per area, each registering its own (`register(app)`).

The commands import vlmkit's heavier modules inside their functions, on purpose: `vlmkit --help`
and a command's start-up would otherwise import torch, transformers and every family for each of
them. That is the one reason for an import inside a function here."""
