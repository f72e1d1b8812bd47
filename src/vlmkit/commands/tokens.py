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
    from vlmkit.presets.budget import lecture_table

    rows = lecture_table()
    typer.echo("The lecture's token-budget table vs the reference implementations")
    typer.echo(f"{'model':<28} {'lecture (typical / max)':<40} reference")
    for r in rows:
        flag = {True: "  ", False: "!!", None: "--"}[r["agrees"]]
        typer.echo(f"{flag}{r['model']:<26} {r['lecture']:<40} {r['reference']}")
    typer.echo("")
    typer.echo("Where the reference disagrees with the lecture (!!) or explains it:")
    for r in rows:
        if r["agrees"] is not True or r["model"].startswith("AnyRes"):
            typer.echo(f"  - {r['model']}: {r['detail']}")


def _aspect(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text or "")
    if not m or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
        raise typer.BadParameter(f"aspect must look like 16:9 (width:height, both positive), got {text!r}", param_hint="--aspect")
    return int(m.group(1)), int(m.group(2))


def _print_prompt(b: dict) -> None:
    """N images in one prompt: the totals, the labelled FLOPs and whether they fit."""
    one = b["per_image"]
    typer.echo(f"{b['preset']} ({b['family']}, {b['fusion']} fusion), {b['images']} images of {b['width']}x{b['height']} in one prompt")
    typer.echo(f"  per image       {one['visual_tokens']:,} visual + {one['special_tokens']:,} special, "
               f"{one['sequence_tokens']:,} in the sequence")
    for k, v in one["parts"].items():
        typer.echo(f"    {_label(k):<28} {_pair(v)}")
    typer.echo(f"  visual tokens   {b['visual_tokens']:,}")
    typer.echo(f"  sequence tokens {b['sequence_tokens']:,}")
    typer.echo(f"  LLM             {b['llm']}")
    for key, label in (("vision", "vision tower"), ("connector", "connector"), ("llm_prefill", "LLM prefill"), ("total", "total")):
        value = b["flops"][key]
        typer.echo(f"  FLOPs, {label:<12} {'unknown (no pixels)' if value is None else _human(value, 'FLOP')}")
    typer.echo(f"  KV cache        {b['kv_cache_bytes'] / 2**20:,.1f} MiB (bf16)")
    _print_fit(b["sequence_tokens"], b["context"])
    for note in b["notes"]:
        typer.echo(f"  note: {note}")


def _print_fit(seq: int, context: int) -> None:
    left = context - seq
    verdict = f"fits, {left:,} tokens left" if left >= 0 else f"does NOT fit, {-left:,} tokens over"
    typer.echo(f"  context share   {seq / context:.2%} of {context:,}: {verdict}")


# Every family on one chart unless --preset picks one.
PLOT_PRESETS = ("llava-1.5-7b", "llava-next-7b", "internvl2-76b", "qwen2-vl-7b", "pixtral-12b",
                "llama-3.2-vision-11b", "idefics3-8b", "smolvlm", "blip2")


def _plot(path: str, names: tuple[str, ...] | list[str] = PLOT_PRESETS, mark: tuple[int, int] | None = None,
          aspect: tuple[int, int] = (4, 3), context: int | None = None) -> dict:
    """Tokens against image width (images of `aspect` width:height); `mark`: a (width, height)
    image drawn as a point; a dashed line at the context length (`context`, else each preset's
    LLM context). Returns what it drew: each preset's token counts per width, the image heights,
    and the context lines."""
    import matplotlib

    from vlmkit.presets.budget import get_preset

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = list(range(64, 2049, 32))
    aw, ah = aspect
    fig, ax = plt.subplots(figsize=(8, 5))
    series, limits = {}, {}
    for name in names:
        costing = get_preset(name)
        proc = costing.processor
        series[name] = [proc.layout(s, max(1, s * ah // aw)).visual_tokens for s in sides]
        ax.plot(sides, series[name], label=name)
        limits.setdefault(context or costing.llm.context, []).append(name)
        if mark is not None:
            ax.plot([mark[0]], [proc.layout(*mark).visual_tokens], "o", color=ax.lines[-1].get_color(),
                    label=f"{name}, {mark[0]}x{mark[1]}")
    for limit, owners in sorted(limits.items()):
        ax.axhline(limit, color="black", linestyle="--", linewidth=0.8, alpha=0.6)
        who = "" if context else f" ({', '.join(owners)})" if len(owners) < len(names) else ""
        ax.annotate(f"context {limit:,}{who}", (sides[0], limit), fontsize=7, va="bottom")
    ax.set_xlabel(f"image width (px), {aw}:{ah} aspect")
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
    return {"widths": sides, "heights": [max(1, s * ah // aw) for s in sides], "tokens": series, "context_lines": sorted(limits)}


def tokens(
    preset: str = typer.Option(None, "--preset", "-p", help="preset name or alias, the same names as `vlmkit inspect` (`vlmkit tokens --list` lists them)"),
    size: str = typer.Option(None, "--size", "-s", help="image size WIDTHxHEIGHT, e.g. 1024x768"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    context: int = typer.Option(None, "--context", help="context length for the share (default: the LLM's)"),
    table: bool = typer.Option(False, "--table", help="the lecture's token-budget table, checked against the reference implementations"),
    plot: str = typer.Option(None, "--plot", help="write a PNG chart of tokens vs image size per family, with the context length as a dashed line"),
    aspect: str = typer.Option("4:3", "--aspect", help="--plot: the images' aspect ratio WIDTH:HEIGHT, e.g. 16:9"),
    list_presets: bool = typer.Option(False, "--list", help="list presets"),
    images: int = typer.Option(None, "--images", "-n", help="N images of SIZE in one prompt: their total tokens, context share and "
                               "whether they fit (each image as the family reads it in an N-image prompt)"),
    frames: int = typer.Option(None, "--frames", "--video", help="video: sampled frames of SIZE (cost = frames x tokens per frame, then compression)"),
    compression: str = typer.Option("none", "--compression", help="video: none | pool | temporal-patch"),
    pooled_frames: int = typer.Option(4, "--pooled-frames", help="video, pool: time windows per video"),
    recipe: str = typer.Option(None, "--recipe", "-r", help="a training recipe instead of a preset: what an image costs the model it builds (built on the meta device, no weights read)"),
    checkpoint: str = typer.Option(None, "--checkpoint", help="a vlmkit checkpoint (e.g. from import-hf) instead of a preset: "
                                   "its own processor settings and context length"),
) -> None:
    """Visual tokens, FLOPs (vision tower, connector, LLM prefill), KV-cache bytes and context share of one image, or of N images or a video, under a preset."""
    # Imported here, not at the top: it pulls in torch, which every other command's start-up
    # (and `vlmkit --help`) would otherwise pay for.
    from vlmkit.presets import names as preset_names
    from vlmkit.presets.budget import get_preset, lecture_table

    if list_presets:
        for name in preset_names():
            p = get_preset(name)
            typer.echo(f"{name:<24} {p.family:<9} {p.llm.name:<40} {p.note}")
        return
    if table:
        rows = lecture_table()
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
        else:
            _print_table()
    if plot:
        names = [preset] if preset else list(PLOT_PRESETS)
        try:
            _plot(plot, names, mark=_size(size) if size else None, aspect=_aspect(aspect), context=context)
        except KeyError as e:
            raise typer.BadParameter(str(e.args[0]), param_hint="--preset") from None
        typer.echo(f"wrote {plot} ({', '.join(names)})", err=as_json)
    if table or plot:
        return
    if images is not None and images <= 0:
        raise typer.BadParameter("--images must be positive", param_hint="--images")
    if checkpoint and size:
        _checkpoint_tokens(checkpoint, *_size(size), context, as_json, images)
        return
    if recipe:
        preset = _recipe_costing(recipe, preset)
    if not preset or not size:
        raise typer.BadParameter("give --preset (or --recipe / --checkpoint) and --size (or --table / --plot / --list)")
    w, h = _size(size)
    if context is not None and context <= 0:
        raise typer.BadParameter("--context must be positive")
    if frames is not None:
        _video(preset, w, h, frames, compression, pooled_frames, as_json, context)
        return
    _image_tokens(preset, w, h, context, as_json, images)


def _recipe_costing(recipe: str, preset: str | None):
    if preset:
        raise typer.BadParameter("give --preset or --recipe, not both")
    from vlmkit.config import ConfigError
    from vlmkit.presets.budget import recipe_costing

    try:
        return recipe_costing(recipe)
    except (ConfigError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def _image_tokens(preset, w: int, h: int, context: int | None, as_json: bool, images: int | None) -> None:
    """One image (the output as it always was, plus labelled FLOPs in --json), or `images` of them in one prompt."""
    from vlmkit.presets.budget import image_budget, prompt_budget

    try:
        b = image_budget(preset, w, h, context=context) if images is None else prompt_budget(preset, w, h, images, context=context)
    except KeyError as e:
        raise typer.BadParameter(str(e.args[0])) from None
    except ValueError as e:  # e.g. Qwen2-VL's aspect-ratio limit
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(b if images is not None else b.to_dict(), indent=2))
    elif images is not None:
        _print_prompt(b)
    else:
        _print_budget(b)


def _checkpoint_tokens(directory: str, w: int, h: int, context: int | None, as_json: bool, images: int | None = None) -> None:
    """The image's layout under a checkpoint's own processor (its settings, not a preset's), read
    from the config alone: no weights are loaded. With `images`, that many in one prompt."""
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
    layout = build_image_processor(model).for_sample(images or 1).layout(w, h)
    ctx = context or config.train.max_length
    n = images or 1
    seq = n * (layout.slots + layout.special_tokens)
    out = {"checkpoint": str(directory), "processor": model.processor.name, "width": w, "height": h,
           "visual_tokens": layout.slots, "special_tokens": layout.special_tokens,
           "sequence_tokens": layout.slots + layout.special_tokens, "context": ctx,
           "context_share": seq / ctx, "parts": layout.parts}
    if images is not None:
        # Counts above are one image's; the prompt's totals and the verdict are new keys.
        out.update(images=n, total_visual_tokens=n * layout.slots, total_sequence_tokens=seq, fits=seq <= ctx)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"{directory} ({model.processor.name} processor), image {w}x{h}" + (f", {n} in one prompt" if images else ""))
    typer.echo(f"  visual tokens   {out['visual_tokens']:,}" + (" per image" if images else ""))
    for k, v in layout.parts.items():
        typer.echo(f"    {_label(k):<28} {_pair(v)}")
    typer.echo(f"  special tokens  {out['special_tokens']:,}" + (" per image" if images else ""))
    typer.echo(f"  sequence tokens {out['sequence_tokens']:,}" + (" per image" if images else ""))
    if images is None:
        typer.echo(f"  context share   {out['context_share']:.2%} of {ctx:,}")
        return
    typer.echo(f"  all {n} images   {seq:,} sequence tokens")
    _print_fit(seq, ctx)


def _video(preset, w: int, h: int, frames: int, compression: str, pooled_frames: int, as_json: bool,
           context: int | None = None) -> None:
    from vlmkit.presets.budget import get_preset
    from vlmkit.processing.video import VideoOptions, video_layout

    if frames <= 0:
        raise typer.BadParameter("--frames must be positive")
    try:
        costing = preset if not isinstance(preset, str) else get_preset(preset)
        proc = costing.processor
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
    # New keys (the recorded ones above keep their values): does the video fit the context?
    ctx = context or costing.llm.context
    out.update(context=ctx, context_share=layout.total_tokens / ctx, fits=layout.total_tokens <= ctx)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"{out['preset']}, video {frames} frames of {w}x{h}, compression {compression}")
    typer.echo(f"  tokens per frame   {out['tokens_per_frame']:,}")
    typer.echo(f"  frames x tokens    {out['uncompressed_tokens']:,}")
    typer.echo(f"  after compression  {layout.visual_tokens:,} visual + {layout.special_tokens:,} special")
    for k, v in parts.items():
        typer.echo(f"    {k:<16} {v}")
    _print_fit(layout.total_tokens, ctx)


def register(app: typer.Typer) -> None:
    app.command("tokens")(tokens)
