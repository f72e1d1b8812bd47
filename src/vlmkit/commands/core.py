"""Subcommands: quickstart, train, chat."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vlmkit.paths import offline


def register(app: typer.Typer) -> None:
    @app.command()
    def quickstart(
        out: Annotated[Path, typer.Option(help="Output folder (data, checkpoints, metrics, plots).")] = Path("runs/quickstart"),
        device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 ...")] = "cpu",
        override: Annotated[Optional[list[str]], typer.Option("--set", help="Dotted config override, e.g. train.stages.instruct.max_steps=100")] = None,
    ) -> None:
        """Build a VLM from packaged pretrained parts, train stages 1-2 on synthetic data, evaluate it."""
        offline()
        _check_device(device)
        from vlmkit.quickstart import run_quickstart

        run_quickstart(out, device=device, overrides=override or [])

    @app.command()
    def train(
        recipe: Annotated[Path, typer.Argument(help="YAML recipe.")],
        overrides: Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides: train.stages.instruct.lr=1e-4")] = None,
    ) -> None:
        """Train every stage of a recipe (resumes from its checkpoints)."""
        offline()
        from vlmkit.config import load_config
        from vlmkit.train.loop import run_training

        config = load_config(recipe, overrides or [])
        _check_device(config.train.device)
        _, results = run_training(config)
        for r in results:
            typer.echo(f"stage {r.name}: {r.steps} steps, final loss {r.losses[-1] if r.losses else float('nan'):.4f}, checkpoint {r.checkpoint}")

    @app.command()
    def chat(
        question: Annotated[str, typer.Argument(help="The question.")],
        checkpoint: Annotated[Path, typer.Option(help="A vlmkit checkpoint folder.")],
        image: Annotated[Optional[list[Path]], typer.Option(help="Image file(s); each gets an <image> placeholder before the question.")] = None,
        video: Annotated[Optional[list[Path]], typer.Option(help="Video file(s), after the images; each gets a <video> placeholder before the question.")] = None,
        max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
        temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
        top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass (0 < top_p <= 1).")] = 1.0,
        seed: Annotated[int, typer.Option(min=-(2**63), max=2**64 - 1)] = 0,
        device: str = "cpu",
    ) -> None:
        """Answer one question about images or videos."""
        offline()
        if top_p <= 0:
            raise typer.BadParameter("must be above 0", param_hint="--top-p")
        _check_device(device)
        from vlmkit.data.formats import Message
        from vlmkit.generate import GenerationConfig, decode, generate
        from vlmkit.processing import build_chat_processor
        from vlmkit.train.checkpoint import load_checkpoint

        model, config = load_checkpoint(checkpoint, device=device)
        from vlmkit.processing.video import VideoInput

        images = list(image or []) + [VideoInput(v) for v in video or []]
        text = question if "<image>" in question else "<image>\n" * len(images) + question
        processor = build_chat_processor(model, config.train.max_length)
        prompt = processor.encode_prompt([Message("user", text)], images)
        # Below 1e-6 the nucleus is the top token alone either way; far smaller values round to 0 in
        # float32 and would leave no token at all.
        gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                               top_p=max(top_p, 1e-6), seed=seed)
        typer.echo(decode(model, generate(model, [prompt], gen))[0])


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter(f"--device {device}: no CUDA device is available here")
