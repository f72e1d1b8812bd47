"""Subcommands: quickstart, train, chat (imports inside the commands: see `vlmkit.commands`)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from vlmkit.paths import offline


OVERRIDES_HELP = "Dotted recipe overrides KEY=VALUE, e.g. train.stages.instruct.max_steps=100 (validated like the recipe)."


def overrides_argument(values: Optional[list[str]]) -> list[str]:
    """The one override syntax of quickstart, train and ablate: positional KEY=VALUE words."""
    values = values or []
    for v in values:
        key, eq, _ = v.partition("=")
        if not eq or not key.strip() or key.startswith("-"):
            raise typer.BadParameter(f"{v!r} is not an override; overrides look like KEY=VALUE, e.g. train.seed=1",
                                     param_hint="OVERRIDES")
    return values


@contextmanager
def recipe_errors():
    """A problem with the recipe, its data or its checkpoints is the user's to fix, not a crash:
    one `error:` line that says what to change, exit status 2."""
    from vlmkit.config import ConfigError
    from vlmkit.checkpoint import ResumeMismatchError
    from vlmkit.train.preflight import DataError

    try:
        yield
    except (ConfigError, DataError, ResumeMismatchError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def on_change(restart: bool, extend: bool) -> str:
    if restart and extend:
        raise typer.BadParameter("give --restart or --extend, not both")
    return "restart" if restart else "extend" if extend else "refuse"


RESTART_HELP = "Train a stage whose settings or data changed since its checkpoint again from the start (and the stages after it)."
EXTEND_HELP = "Train a stage whose settings or data changed on from its trained weights (and the stages after it again)."


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart_command)
    app.command("train")(train_command)
    app.command("chat")(chat_command)


def quickstart_command(
    overrides: Annotated[Optional[list[str]], typer.Argument(help=OVERRIDES_HELP, show_default=False, metavar="KEY=VALUE")] = None,
    out: Annotated[Path, typer.Option(help="Output folder (data, checkpoints, metrics, plots).")] = Path("runs/quickstart"),
    device: Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:1 ...")] = "cpu",
    restart: Annotated[bool, typer.Option("--restart", help=RESTART_HELP)] = False,
    extend: Annotated[bool, typer.Option("--extend", help=EXTEND_HELP)] = False,
) -> None:
    """Build a VLM from packaged pretrained parts, train stages 1-2 on synthetic data, evaluate it."""
    overrides = overrides_argument(overrides)
    mode = on_change(restart, extend)
    offline()
    check_device(device)
    from vlmkit.quickstart import run_quickstart

    with recipe_errors():
        run_quickstart(out, device=device, overrides=overrides, on_change=mode)


NO_GUARD_HELP = ("No stage-boundary warning (a stage that trains the vision tower or the LLM before the connector has "
                 "trained train.stage_guard.min_connector_steps steps); as train.stage_guard=false.")


def train_command(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (`vlmkit recipe --template` writes one).", metavar="RECIPE")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help=OVERRIDES_HELP, show_default=False, metavar="KEY=VALUE")] = None,
    device: Annotated[Optional[str], typer.Option(help="Torch device (cpu, cuda, cuda:1 ...); default: the recipe's train.device.")] = None,
    restart: Annotated[bool, typer.Option("--restart", help=RESTART_HELP)] = False,
    extend: Annotated[bool, typer.Option("--extend", help=EXTEND_HELP)] = False,
    no_guard: Annotated[bool, typer.Option("--no-guard", help=NO_GUARD_HELP)] = False,
) -> None:
    """Train every stage of a recipe. A finished stage is loaded, not redone; a stopped one resumes.

    A stage whose settings or data changed since its checkpoint is refused, listing what
    changed, unless --restart or --extend says what to do (stages after it are trained again).
    """
    overrides = overrides_argument(overrides)
    mode = on_change(restart, extend)
    offline()
    from vlmkit.config import load_config
    from vlmkit.train.loop import run_training

    if device is not None:
        overrides = [*overrides, f"train.device={device}"]
    if no_guard:
        overrides = [*overrides, "train.stage_guard=false"]
    with recipe_errors():
        config = load_config(recipe, overrides)
        check_device(config.train.device)
        _, results = run_training(config, on_change=mode)
    for r in results:
        if r.loaded:
            typer.echo(f"stage {r.name}: already trained with these settings; loaded {r.checkpoint}")
        else:
            how = " (extended from its earlier checkpoint)" if r.extended else ""
            typer.echo(f"stage {r.name}: {r.steps} steps{how}, final loss {r.losses[-1]:.4f}{heldout_summary(r.heldout)}, "
                       f"checkpoint {r.checkpoint}")
            if r.plots:
                typer.echo(f"stage {r.name}: curves {', '.join(str(p) for p in r.plots)}")


def heldout_summary(scores: dict | None) -> str:
    """`, held-out synth-qa 62.0% (30 items; word 70.0%, bar 40.0%)`: the stage's last `train.eval` check."""
    if not scores:
        return ""
    breakdown = [f"{k} {v:.1%}" for k, v in (scores.get("breakdown") or {}).items()
                 if k and isinstance(v, (int, float))]
    # A benchmark with many categories (MMMU's 30 subjects) would bury the line; heldout.png has them all.
    parts = ", ".join(breakdown[:8]) + (f", {len(breakdown) - 8} more" if len(breakdown) > 8 else "")
    return f", held-out {scores['benchmark']} {scores['overall']:.1%} ({scores['items']} items{'; ' + parts if parts else ''})"


def chat_command(
    question: Annotated[Optional[str], typer.Argument(help="The question; without one, an interactive conversation starts.", show_default=False, metavar="QUESTION")] = None,
    checkpoint: Annotated[Path, typer.Option(help="A vlmkit checkpoint folder.", exists=True, file_okay=False)] = ...,
    image: Annotated[Optional[list[Path]], typer.Option(help="Image file (repeatable); each gets an <image> placeholder before the (first) question.",
                                                        show_default=False, metavar="PATH", exists=True, dir_okay=False)] = None,
    video: Annotated[Optional[list[Path]], typer.Option(help="Video file (repeatable), after the images; each gets a placeholder before the (first) question.",
                                                        show_default=False, metavar="PATH", exists=True, dir_okay=False)] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer, in tokens.")] = 64,
    temperature: Annotated[float, typer.Option(min=0, help="Sampling temperature; 0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0, max=1, help="Nucleus sampling: keep the most likely tokens up to this probability mass.")] = 1.0,
    seed: Annotated[int, typer.Option(min=-(2**63), max=2**64 - 1, help="Random seed for sampling (same seed, same answer).")] = 0,
    device: Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:1 ...")] = "cpu",
) -> None:
    """Answer a question about images or videos; without a question, hold a conversation.

    In a conversation the model is loaded once and keeps every turn:
    /image PATH attaches an image to the next message, /reset starts over, /quit ends.
    """
    offline()
    if top_p <= 0:
        raise typer.BadParameter("must be above 0", param_hint="--top-p")
    check_device(device)
    from vlmkit.chat import ChatSession
    from vlmkit.generate import GenerationConfig
    from vlmkit.processing import build_chat_processor
    from vlmkit.checkpoint import load_checkpoint

    model, config = load_checkpoint(checkpoint, device=device)
    processor = build_chat_processor(model, config.train.max_length)
    # Below 1e-6 the nucleus is the top token alone either way; far smaller values round to 0 in
    # float32 and would leave no token at all.
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                           top_p=max(top_p, 1e-6), seed=seed)
    # Answer in the precision the checkpoint trained in, as `eval run` does.
    session = ChatSession(model, processor, gen, bf16=config.train.precision == "bf16")
    from vlmkit.processing.video import VideoInput

    session.pending.extend([*(image or []), *(VideoInput(v) for v in video or [])])
    if question is not None:
        typer.echo(session.ask(question))
        return
    _converse(session, checkpoint)


def _converse(session, checkpoint: Path) -> None:
    import sys

    from vlmkit.chat import HELP
    from vlmkit.data.formats import BadRecordError

    interactive = sys.stdin.isatty()
    typer.echo(f"chatting with {checkpoint}. {HELP}", err=True)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        command, _, arg = text.partition(" ")
        if command in ("/quit", "/exit"):
            break
        if command == "/help":
            typer.echo(HELP, err=True)
        elif command == "/reset":
            session.reset()
            typer.echo("(new conversation)", err=True)
        elif command == "/image":
            try:
                path = session.attach(arg.strip())
                typer.echo(f"(image {path} attached to your next message)", err=True)
            except FileNotFoundError as e:
                typer.echo(f"error: {e}", err=True)
        elif command.startswith("/"):
            typer.echo(f"error: unknown command {command}; {HELP}", err=True)
        else:
            try:
                typer.echo(session.ask(text))
            except BadRecordError as e:
                typer.echo(f"error: {e.reason} (that message was dropped; the conversation goes on)", err=True)


def check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter(f"--device {device}: no CUDA device is available here")
