"""Command-line fixes from the first-hour report: each test failed before its fix."""

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
