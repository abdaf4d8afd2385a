"""CLI surface: every command has --help; user errors print a message and no traceback."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cli.main import app

COMMANDS = ["shards", "embed-text", "train", "eval", "search", "plot", "demo", "bench", "bench loader",
            "bench train"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    result = CliRunner().invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_root_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    for name in ("shards", "embed-text", "train", "eval", "search", "plot", "demo", "bench"):
        assert name in result.output


BOOM = """
from cli.main import app, main
from pipeline.errors import UserError

@app.command("boom")
def boom():
    raise UserError("no captions.parquet in x: did you run `clipcoco shards`?")

main()
"""


def _run(*args):
    return subprocess.run([sys.executable, "-c", BOOM, *args], capture_output=True, text=True)


def test_user_error_prints_message_without_traceback():
    proc = _run("boom")
    assert proc.returncode == 2
    assert "error: no captions.parquet in x: did you run `clipcoco shards`?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_shows_traceback():
    proc = _run("--debug", "boom")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "UserError" in proc.stderr
