"""`vlmkit tokens`: what an image costs a preset, and the lecture's token-budget table checked
against the reference implementations.

Presets are the registry's (`vlmkit.presets`), the same names `vlmkit inspect` takes."""

from __future__ import annotations

import json
import re

import typer



def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not m:
        raise typer.BadParameter(f"size must look like 1024x768 (width x height), got {text!r}")
    w, h = int(m.group(1)), int(m.group(2))
    if w <= 0 or h <= 0:
        raise typer.BadParameter(f"size must be positive, got {w}x{h}")
    return w, h


def _human(n: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


# What each pair in a layout's parts means: sizes are (width, height), grids (rows, cols).
PART_LABELS = {
    "resized": "resized (width x height)",
    "base_image": "base image (width x height)",
    "best_resolution": "best resolution (w x h)",
    "grid": "tile grid (rows x cols)",
    "feature_grid": "feature grid (rows x cols)",
    "grid_thw": "grid (frames x rows x cols)",
}


def _label(key: str) -> str:
    return PART_LABELS.get(key, key.replace("_", " "))


def _pair(value) -> str:
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return " x ".join(str(v) for v in value)
    return str(value)


def _print_budget(b) -> None:
    typer.echo(f"{b.preset} ({b.family}, {b.fusion} fusion), image {b.width}x{b.height}")
    typer.echo(f"  visual tokens   {b.visual_tokens:,}")
    for k, v in b.parts.items():
        typer.echo(f"    {_label(k):<28} {_pair(v)}")
    typer.echo(f"  special tokens  {b.special_tokens:,}")
    typer.echo(f"  sequence tokens {b.sequence_tokens:,}")
    typer.echo(f"  LLM             {b.llm}")
    typer.echo(f"  prefill         {_human(b.prefill_flops, 'FLOP')}")
    typer.echo(f"  KV cache        {b.kv_cache_bytes / 2**20:,.1f} MiB (bf16)")
    typer.echo(f"  context share   {b.context_share:.2%} of {b.context:,}")
    for note in b.notes:
        typer.echo(f"  note: {note}")


def _print_table() -> None:
    from vlmkit.presets.budget import seed_table

    rows = seed_table()
    typer.echo("The lecture's token-budget table vs the reference implementations")
    typer.echo(f"{'model':<28} {'lecture (typical / max)':<40} reference")
    for r in rows:
        flag = {True: "  ", False: "!!", None: "--"}[r["agrees"]]
        typer.echo(f"{flag}{r['model']:<26} {r['seed']:<40} {r['reference']}")
    typer.echo("")
    typer.echo("Where the reference disagrees with the lecture (!!) or explains it:")
    for r in rows:
        if r["agrees"] is not True or r["model"].startswith("AnyRes"):
            typer.echo(f"  - {r['model']}: {r['detail']}")


# Every family on one chart unless --preset picks one.
PLOT_PRESETS = ("llava-1.5-7b", "llava-next-7b", "internvl2-76b", "qwen2-vl-7b", "pixtral-12b",
                "llama-3.2-vision-11b", "idefics3-8b", "smolvlm", "blip2")


def _plot(path: str, names: tuple[str, ...] | list[str] = PLOT_PRESETS, mark: tuple[int, int] | None = None) -> None:
    """Tokens against image width (4:3 images); `mark`: a (width, height) image drawn as a point."""
    import matplotlib

    from vlmkit.presets.budget import get_preset

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = list(range(64, 2049, 32))
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        proc = get_preset(name).processor
        ax.plot(sides, [proc.layout(s, s * 3 // 4).visual_tokens for s in sides], label=name)
        if mark is not None:
            ax.plot([mark[0]], [proc.layout(*mark).visual_tokens], "o", color=ax.lines[-1].get_color(),
                    label=f"{name}, {mark[0]}x{mark[1]}")
    ax.set_xlabel("image width (px), 4:3 aspect")
    ax.set_ylabel("visual tokens per image")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    title = "Visual tokens vs image size" if len(names) > 1 else f"Visual tokens vs image size: {names[0]}"
    if "llama-3.2-vision-11b" in names:
        title += " (Llama 3.2 Vision: cross-attention states)"
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tokens(
    preset: str = typer.Option(None, "--preset", "-p", help="preset name or alias, the same names as `vlmkit inspect` (`vlmkit tokens --list` lists them)"),
    size: str = typer.Option(None, "--size", "-s", help="image size WIDTHxHEIGHT, e.g. 1024x768"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    context: int = typer.Option(None, "--context", help="context length for the share (default: the LLM's)"),
    table: bool = typer.Option(False, "--table", help="the lecture's token-budget table, checked against the reference implementations"),
    plot: str = typer.Option(None, "--plot", help="write a PNG chart of tokens vs image size per family"),
    list_presets: bool = typer.Option(False, "--list", help="list presets"),
    frames: int = typer.Option(None, "--frames", help="video: sampled frames of SIZE (cost = frames x tokens per frame, then compression)"),
    compression: str = typer.Option("none", "--compression", help="video: none | pool | temporal-patch"),
    pooled_frames: int = typer.Option(4, "--pooled-frames", help="video, pool: time windows per video"),
    recipe: str = typer.Option(None, "--recipe", "-r", help="a training recipe instead of a preset: what an image costs the model it builds (built on the meta device, no weights read)"),
    checkpoint: str = typer.Option(None, "--checkpoint", help="a vlmkit checkpoint (e.g. from import-hf) instead of a preset: "
                                   "its own processor settings and context length"),
) -> None:
    """Visual tokens, prefill FLOPs, KV-cache bytes and context share of one image under a preset."""
    # Imported here, not at the top: it pulls in torch, which every other command's start-up
    # (and `vlmkit --help`) would otherwise pay for.
    from vlmkit.presets import names as preset_names
    from vlmkit.presets.budget import get_preset, image_budget, seed_table

    if list_presets:
        for name in preset_names():
            p = get_preset(name)
            typer.echo(f"{name:<24} {p.family:<9} {p.llm.name:<40} {p.note}")
        return
    if table:
        rows = seed_table()
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
        else:
            _print_table()
    if plot:
        names = [preset] if preset else list(PLOT_PRESETS)
        try:
            _plot(plot, names, mark=_size(size) if size else None)
        except KeyError as e:
            raise typer.BadParameter(str(e.args[0]), param_hint="--preset") from None
        typer.echo(f"wrote {plot} ({', '.join(names)})", err=as_json)
    if table or plot:
        return
    if checkpoint and size:
        _checkpoint_tokens(checkpoint, *_size(size), context, as_json)
        return
    if recipe:
        if preset:
            raise typer.BadParameter("give --preset or --recipe, not both")
        from vlmkit.config import ConfigError
        from vlmkit.presets.budget import recipe_costing

        try:
            preset = recipe_costing(recipe)
        except (ConfigError, ValueError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
    if not preset or not size:
        raise typer.BadParameter("give --preset (or --recipe / --checkpoint) and --size (or --table / --plot / --list)")
    w, h = _size(size)
    if context is not None and context <= 0:
        raise typer.BadParameter("--context must be positive")
    if frames is not None:
        _video(preset, w, h, frames, compression, pooled_frames, as_json)
        return
    try:
        b = image_budget(preset, w, h, context=context)
    except KeyError as e:
        raise typer.BadParameter(str(e.args[0])) from None
    except ValueError as e:  # e.g. Qwen2-VL's aspect-ratio limit
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(b.to_dict(), indent=2))
    else:
        _print_budget(b)


def _checkpoint_tokens(directory: str, w: int, h: int, context: int | None, as_json: bool) -> None:
    """The image's layout under a checkpoint's own processor (its settings, not a preset's), read
    from the config alone: no weights are loaded."""
    from vlmkit.processing import build_image_processor
    from vlmkit.checkpoint import read_config

    try:
        config = read_config(directory)
    except FileNotFoundError as e:
        raise typer.BadParameter(str(e), param_hint="--checkpoint") from None
    model = config.model
    if model.processor.name == "fixed":
        # Its count is the connector's output for the tower's grid: known only to a built model.
        raise typer.BadParameter("a fixed-size processor costs the same for every image: `vlmkit inspect` or a preset gives it",
                                 param_hint="--checkpoint")
    layout = build_image_processor(model).layout(w, h)
    ctx = context or config.train.max_length
    out = {"checkpoint": str(directory), "processor": model.processor.name, "width": w, "height": h,
           "visual_tokens": layout.slots, "special_tokens": layout.special_tokens,
           "sequence_tokens": layout.slots + layout.special_tokens, "context": ctx,
           "context_share": (layout.slots + layout.special_tokens) / ctx, "parts": layout.parts}
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"{directory} ({model.processor.name} processor), image {w}x{h}")
    typer.echo(f"  visual tokens   {out['visual_tokens']:,}")
    for k, v in layout.parts.items():
        typer.echo(f"    {_label(k):<28} {_pair(v)}")
    typer.echo(f"  special tokens  {out['special_tokens']:,}")
    typer.echo(f"  sequence tokens {out['sequence_tokens']:,}")
    typer.echo(f"  context share   {out['context_share']:.2%} of {ctx:,}")


def _video(preset, w: int, h: int, frames: int, compression: str, pooled_frames: int, as_json: bool) -> None:
    from vlmkit.presets.budget import get_preset
    from vlmkit.processing.video import VideoOptions, video_layout

    if frames <= 0:
        raise typer.BadParameter("--frames must be positive")
    try:
        proc = (preset if not isinstance(preset, str) else get_preset(preset)).processor
        opts = VideoOptions(compression=compression, pooled_frames=pooled_frames)
        layout = video_layout(proc, w, h, frames, opts)
    except KeyError as e:
        raise typer.BadParameter(str(e.args[0])) from None
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    parts = dict(layout.parts)
    out = {"preset": preset if isinstance(preset, str) else preset.name, "width": w, "height": h, "frames": frames, "compression": compression,
           "tokens_per_frame": parts.pop("frame_tokens"), "uncompressed_tokens": parts.pop("uncompressed_tokens"),
           "visual_tokens": layout.visual_tokens, "special_tokens": layout.special_tokens,
           "sequence_tokens": layout.total_tokens, "parts": parts}
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"{out['preset']}, video {frames} frames of {w}x{h}, compression {compression}")
    typer.echo(f"  tokens per frame   {out['tokens_per_frame']:,}")
    typer.echo(f"  frames x tokens    {out['uncompressed_tokens']:,}")
    typer.echo(f"  after compression  {layout.visual_tokens:,} visual + {layout.special_tokens:,} special")
    for k, v in parts.items():
        typer.echo(f"    {k:<16} {v}")


def register(app: typer.Typer) -> None:
    app.command("tokens")(tokens)
