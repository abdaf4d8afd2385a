"""`clipcoco bench`: not implemented yet (issue 8)."""

import typer

from pipeline.errors import UserError

app = typer.Typer(help="Measure each stage against its peer.", no_args_is_help=True)


@app.command("loader")
def loader() -> None:
    """Decode + augment throughput of a loader."""
    raise UserError("not implemented yet: issue 8")


@app.command("train")
def train() -> None:
    """Training images/s from the real loader vs synthetic batches."""
    raise UserError("not implemented yet: issue 8")
