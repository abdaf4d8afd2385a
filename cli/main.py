"""`clipcoco`: the typer app. Each command lives in its own module as a thin wrapper over one
library function; this module only assembles them and turns a `UserError`, or a file-system error the user can
fix (disk full, read-only, no permission, a path too long: `pipeline.errors.os_error_message`), into a short message.
"""

import os
import sys

import typer

from cli import bench, demo, embed_images, embed_text, evaluate, export, plot, search, shards, train, zeroshot
from pipeline import __version__
from pipeline.errors import Interrupted, UserError, os_error_message

app = typer.Typer(
    name="clipcoco",
    help=(
        "Train and evaluate a CLIP (ResNet image tower + frozen, cached DistilBERT text tower) on COCO "
        "Captions.\n\n"
        "Pipeline: [bold]shards[/] -> [bold]embed-text[/] -> [bold]train[/] -> [bold]eval[/]. "
        "Try [bold]clipcoco demo[/] first: the whole pipeline on generated data, offline, on a CPU."
    ),
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

app.command("shards", no_args_is_help=True)(shards.command)
app.command("embed-text", no_args_is_help=True)(embed_text.command)
app.command("embed-images", no_args_is_help=True)(embed_images.command)
app.command("train", no_args_is_help=True)(train.command)
app.command("eval", no_args_is_help=True)(evaluate.command)
app.command("search", no_args_is_help=True)(search.command)
app.command("zeroshot", no_args_is_help=True)(zeroshot.command)
app.command("export", no_args_is_help=True)(export.command)
app.command("plot", no_args_is_help=True)(plot.command)
app.add_typer(bench.app, name="bench")
app.command("demo")(demo.command)

_debug = {"on": os.environ.get("CLIPCOCO_DEBUG", "") not in ("", "0")}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"clipcoco {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of a user error too."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    if debug:
        _debug["on"] = True


def main() -> None:
    try:
        app(prog_name="clipcoco")
    except (UserError, OSError) as err:
        message = str(err) if isinstance(err, UserError) else os_error_message(err)
        if _debug["on"] or message is None:
            raise
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except Interrupted as stop:
        if str(stop):  # under torchrun rank 0 says how to continue, the other ranks nothing
            typer.secho(str(stop), fg=typer.colors.YELLOW, err=True)
        # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C. Under torchrun every rank exits 0:
        # torchrun takes any other code for a failure (a ChildFailedError report, a restart with --max-restarts).
        sys.exit(0 if "TORCHELASTIC_RUN_ID" in os.environ else 130)  # set by torchrun, even with one process


if __name__ == "__main__":  # `python -m cli.main` runs the tool as the `clipcoco` script does
    main()
