"""What the command line says: help texts, labels and plots, and errors caught before any work is
done (a busy port, a missing image or checkpoint)."""

from __future__ import annotations

import socket

from typer.testing import CliRunner

from vlmkit.cli import app


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_serve_on_a_busy_port_fails_before_announcing(tmp_path):
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        # No checkpoint is needed: the port is taken before anything is loaded.
        result = invoke("serve", "--checkpoint", str(tmp_path / "none"), "--port", str(port))
    finally:
        busy.close()
    assert result.exit_code == 2
    assert "serving" not in result.output
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.output


def test_tokens_plot_honours_the_preset(tmp_path, monkeypatch):
    from vlmkit.commands import tokens as tokens_cmd

    plotted = []
    real = tokens_cmd._plot

    def spy(path, names=tokens_cmd.PLOT_PRESETS, mark=None, **options):  # options: --aspect, --context
        plotted.append(list(names))
        real(path, names, mark, **options)

    monkeypatch.setattr(tokens_cmd, "_plot", spy)
    every, one = tmp_path / "every.png", tmp_path / "one.png"
    assert invoke("tokens", "--plot", str(every)).exit_code == 0
    result = invoke("tokens", "--plot", str(one), "-p", "qwen2-vl-7b")
    assert result.exit_code == 0, result.output
    assert plotted == [list(tokens_cmd.PLOT_PRESETS), ["qwen2-vl-7b"]]
    assert "qwen2-vl-7b" in result.output
    assert one.read_bytes() != every.read_bytes()
    bad = invoke("tokens", "--plot", str(tmp_path / "x.png"), "-p", "no-such-model")
    assert bad.exit_code != 0 and "unknown preset 'no-such-model'" in bad.output


def test_tokens_labels_sizes_and_grids():
    result = invoke("tokens", "-p", "llava-next-7b", "-s", "1024x768")
    assert result.exit_code == 0, result.output
    # 1024x768 fits the 672x672 pinpoint as 672 wide, 504 high; its features are 36 rows of 48.
    assert "resized (width x height)     672 x 504" in result.output
    assert "feature grid (rows x cols)   36 x 48" in result.output
    assert "tile grid (rows x cols)      2 x 2" in result.output


def test_inspect_help_points_to_the_real_list_subcommand():
    result = invoke("inspect", "--help")
    text = " ".join(result.output.split())  # help text wraps at any space
    assert "vlmkit inspect list" in text and "--list" not in text
    listed = invoke("inspect", "list")
    assert listed.exit_code == 0 and "llava-1.5-7b" in listed.output


def test_inspect_tiny_header_is_clean():
    result = invoke("inspect", "smolvlm", "--tiny")
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0]
    assert "(;" not in header and "()" not in header
    assert header.startswith("smolvlm (tiny)") and "pixel-shuffle" in header


def _commands():
    import click
    import typer

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield path, cmd

    return list(walk(typer.main.get_command(app), []))


def test_every_option_and_argument_is_described():
    missing = [f"{' '.join(path)} {p.name}" for path, cmd in _commands() for p in cmd.params if p.name != "help" and not p.help]
    assert not missing, missing


def test_help_has_no_type_noise_and_version_prints():
    for path, _ in _commands():
        text = invoke(*path, "--help").output
        assert "<bool>" not in text, path
    assert invoke("--version").output.startswith("vlmkit 0.")


def test_synth_bench_help_names_the_file_it_writes(tmp_path):
    text = " ".join(invoke("data", "synth-bench", "--help").output.split())
    result = invoke("data", "synth-bench", "chartqa", str(tmp_path / "chartqa"), "--n", "2")
    assert result.exit_code == 0, result.output
    written = [p.name for p in (tmp_path / "chartqa").iterdir() if p.suffix == ".jsonl"]
    assert written and all(name in text for name in written)


def test_chat_names_a_missing_image_or_checkpoint_before_loading(tmp_path):
    (tmp_path / "ck").mkdir()
    missing = invoke("chat", "--checkpoint", str(tmp_path / "ck"), "--image", str(tmp_path / "nope.png"), "What?")
    assert missing.exit_code == 2 and "nope.png" in missing.output and "does not exist" in missing.output
    no_checkpoint = invoke("chat", "--checkpoint", str(tmp_path / "gone"), "What?")
    assert no_checkpoint.exit_code == 2 and "gone" in no_checkpoint.output
