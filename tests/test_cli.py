"""CLI surface: every command has --help; user errors print a message and no traceback."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

COMMANDS = ["shards", "embed-text", "train", "eval", "search", "zeroshot", "plot", "demo", "bench", "bench loader",
            "bench train"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    result = CliRunner().invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_root_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    for name in ("shards", "embed-text", "train", "eval", "search", "zeroshot", "plot", "demo", "bench"):
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


@pytest.mark.parametrize("text_model", ["distilbert-base-uncased", "sentence-transformers/all-MiniLM-L6-v2", "local"])
def test_make_recipe_reads_the_caches_embed_text_writes(tmp_path, text_model):
    """`make -n`: train and eval read exactly the files embed-text was told to write, for hub names and folders."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    if text_model == "local":
        text_model = str(tmp_path / "my-bert")
        Path(text_model).mkdir()
        (Path(text_model) / "config.json").write_text("{}")
    repo = Path(__file__).resolve().parents[1]
    lines = subprocess.run(["make", "-n", "-o", "install", "embed-text", "train", "eval", f"TEXT_MODEL={text_model}"],
                           cwd=repo, capture_output=True, text=True, check=True).stdout
    written = set(re.findall(r"embed-text \S+ .*--out (\S+)", lines))
    read = set(re.findall(r"--text (\S+)", lines))
    assert len(written) == 2 and read == written, lines
    if text_model.endswith("my-bert"):
        assert all(p.endswith("/text-my-bert-mean.parquet") for p in written)
