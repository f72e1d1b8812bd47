"""Subcommands: serve (OpenAI-compatible server), export-hf and import-hf (Hugging Face folders)."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Annotated, Optional

import typer

from vlmkit.commands.core import check_device
from vlmkit.paths import offline


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        typer.echo(f"error: cannot listen on {host}:{port}: {e.strerror or e}", err=True)
        raise typer.Exit(2) from None


OVERWRITE_HELP = ("Replace OUT even if it is a non-empty folder this command did not write (it is swapped out in one "
                  "step once the new output is complete). Never allowed for the source or a folder holding it.")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
    app.command("export-hf")(export_hf_command)
    app.command("import-hf")(import_hf_command)


def serve_command(
    checkpoint: Annotated[Path, typer.Option(help="A vlmkit checkpoint folder.")],
    host: Annotated[str, typer.Option(help="Interface to listen on; loopback unless you mean to expose it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="VLMKIT_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 routes.")] = None,
    allow_remote_images: Annotated[bool, typer.Option(help="Let requests name http(s) image URLs, which the server then fetches.")] = False,
    model_name: Annotated[Optional[str], typer.Option(help="The model id clients send (default: the checkpoint folder's name).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Most requests decoded together.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="How long the first request of a batch waits for company.")] = 10.0,
    max_tokens: Annotated[int, typer.Option(min=1, help="Largest max_tokens a request may ask for.")] = 1024,
    max_request_bytes: Annotated[int, typer.Option(min=1024, help="Largest request body.")] = 20 * 1024 * 1024,
    max_image_pixels: Annotated[int, typer.Option(min=1, help="Largest decoded image, in pixels.")] = 16_000_000,
    max_images: Annotated[int, typer.Option(min=0, help="Most images in one request.")] = 8,
    body_timeout: Annotated[float, typer.Option(min=0.001, help="Seconds a client has to send a request's whole body; an unfinished one gets a 408.")] = 30.0,
    max_length: Annotated[Optional[int], typer.Option(help="Prompt length limit in tokens (default: the checkpoint's train.max_length).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 ...")] = "cpu",
    compile_decode: Annotated[bool, typer.Option(help="Compile the decode step (CUDA graphs on a GPU; batches padded to powers of two). Each batch size compiles once, on first use.")] = False,
    image_format: Annotated[Optional[list[str]], typer.Option(help="Image format requests may use (repeat it; default PNG, JPEG, WEBP, GIF, BMP, TIFF).")] = None,
    allowed_host: Annotated[Optional[list[str]], typer.Option(help="Without --api-key: a Host name clients may use besides loopback and --host (repeat it; '*' for any).")] = None,
    allowed_origin: Annotated[Optional[list[str]], typer.Option(help="Without --api-key: a browser Origin allowed besides the server's own, e.g. http://localhost:3000 (repeat it; '*' for any).")] = None,
    batching: Annotated[str, typer.Option(help="'continuous': requests join and leave the running batch between decoding steps; 'static': a batch decodes to its end before the next forms.")] = "continuous",
    feature_cache: Annotated[bool, typer.Option(help="Cache each image's visual tokens (keyed by its pixels, the processor's output and the weights).")] = True,
    feature_cache_mb: Annotated[float, typer.Option(min=0, help="Memory for the image-feature cache, in MB (least recently used entries go first).")] = 256.0,
    prefix_cache: Annotated[bool, typer.Option(help="Reuse the keys and values of prompt prefixes already computed (a shared system turn and image).")] = True,
    prefix_cache_mb: Annotated[float, typer.Option(min=0, help="Memory for the prefix cache, in MB.")] = 256.0,
    quantize: Annotated[Optional[str], typer.Option(help="'int8': int8 weight-only linear layers (torchao; pip install 'vlmkit[serve-int8]').")] = None,
) -> None:
    """Serve a checkpoint over an OpenAI-compatible /v1/chat/completions API, with a web page at /."""
    offline()
    from vlmkit.processing import build_chat_processor
    from vlmkit.processing.images import image_formats
    from vlmkit.serve.app import ServerSettings, create_app, run_server
    from vlmkit.checkpoint import load_checkpoint

    check_device(device)
    if batching not in ("continuous", "static"):
        raise typer.BadParameter(f"{batching!r}: use 'continuous' or 'static'", param_hint="--batching")
    if quantize is not None and quantize != "int8":
        raise typer.BadParameter(f"{quantize!r}: the one mode is 'int8'", param_hint="--quantize")
    try:
        formats = list(image_formats(image_format)) if image_format else None
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--image-format") from None
    hosts = list(allowed_host or [])
    if host not in ("0.0.0.0", "::", ""):
        hosts.append(host)
    if not _is_loopback(host) and not api_key:
        typer.echo(f"warning: listening on {host} without --api-key; anyone who can reach it can use the model", err=True)
    # Bound before the model loads and before announcing, so a busy port fails at once and
    # the address printed is one the server really holds.
    sock = _bind(host, port)
    model, config = load_checkpoint(checkpoint, device=device)
    if quantize is not None:
        from vlmkit.serve.quantize import QuantizationError, quantize_weights

        try:
            quantize_weights(model, quantize)
        except QuantizationError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
    processor = build_chat_processor(model, max_length or config.train.max_length)
    settings = ServerSettings(
        model_name=model_name or checkpoint.resolve().name, api_key=api_key, allow_remote_images=allow_remote_images,
        max_request_bytes=max_request_bytes, max_image_pixels=max_image_pixels, max_images=max_images, body_timeout_s=body_timeout,
        max_tokens_limit=max_tokens, default_max_tokens=min(256, max_tokens), max_batch=max_batch, max_wait_ms=max_wait_ms,
        compile_decode=compile_decode, image_formats=formats, allowed_hosts=hosts, allowed_origins=list(allowed_origin or []),
        bf16=config.train.precision == "bf16",  # answer in the precision the checkpoint trained in
        batching=batching, feature_cache_mb=feature_cache_mb if feature_cache else 0.0,
        prefix_cache_mb=prefix_cache_mb if prefix_cache else 0.0,
    )
    port = sock.getsockname()[1]
    typer.echo(f"serving {settings.model_name!r} on http://{host}:{port}/ (API at /v1, health at /health)")
    run_server(create_app(model, processor, settings), host=host, port=port, sock=sock)


def export_hf_command(
    checkpoint: Annotated[Path, typer.Option(help="A vlmkit checkpoint folder.")],
    out: Annotated[Path, typer.Argument(help="Folder to write (the family's transformers model + processor files). "
                                             "A non-empty folder is replaced only if it is an earlier export, or with --overwrite.")],
    check: Annotated[bool, typer.Option(help="Reload the export with transformers and compare logits.")] = True,
    adapters: Annotated[str, typer.Option(help="LoRA adapters of the checkpoint: 'merge' (into the base weights) or "
                                               "'peft' (base model in OUT, a PEFT adapter folder in OUT/adapter).")] = "merge",
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
) -> None:
    """Export a checkpoint in its family's Hugging Face format (see `vlmkit import-hf --help`
    for the families). LoRA adapters are merged, or written as a PEFT folder (`--adapters peft`).
    Prints the transformers lines that load the result, and how to load it without torchvision
    where the family's processor needs it."""
    offline()
    from vlmkit.hf.registry import export_hf as export_family, family_of, verify_hf_export
    from vlmkit.hf.usage import load_instructions
    from vlmkit.hf.output_folder import claim_output
    from vlmkit.checkpoint import load_checkpoint

    if adapters not in ("merge", "peft"):
        raise typer.BadParameter(f"{adapters!r}: use 'merge' or 'peft'", param_hint="--adapters")
    # Refused before the checkpoint loads: nothing is read or written for an OUT that may not be replaced.
    claim_output(out, command="export-hf", sources=(checkpoint,), overwrite=overwrite)
    model, _ = load_checkpoint(checkpoint, merge=adapters == "merge")
    if adapters == "peft":
        from vlmkit.hf.peft import export_hf_peft

        export_hf_peft(model, out, overwrite=overwrite)
    else:
        export_family(model, out, overwrite=overwrite)
    typer.echo(f"wrote {out} ({family_of(model)})" + (f", adapters in {out / 'adapter'} (PEFT)" if adapters == "peft" else ""))
    typer.echo(load_instructions(out, out.resolve() / "adapter" if adapters == "peft" else None, checkpoint))
    if check:
        if adapters == "peft":
            from vlmkit.hf.peft import verify_peft_export

            diff = verify_peft_export(model, out)
            typer.echo(f"check: transformers + PEFT reload matches vlmkit's unmerged model (max |logit difference| {diff:.2e})")
        else:
            diff = verify_hf_export(model, out)
            typer.echo(f"check: transformers' reload matches vlmkit (max |logit difference| {diff:.2e})")


def import_hf_command(
    folder: Annotated[Path, typer.Argument(help="A Hugging Face model folder of a supported family (safetensors); an unsupported one is refused with the list.")],
    out: Annotated[Path, typer.Argument(help="vlmkit checkpoint folder to write. A non-empty folder is replaced only if it "
                                             "is an earlier import, or with --overwrite; never the source or a folder holding it.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
) -> None:
    """Turn a Hugging Face model folder into a vlmkit checkpoint (for training, eval, serving).
    The family comes from its config.json; models that need trust_remote_code are refused.
    A refusal is one `error:` line naming the file and field, exit status 1."""
    offline()
    from vlmkit.hf.registry import import_hf

    import_hf(folder, out, overwrite=overwrite)
    typer.echo(f"wrote {out}")

