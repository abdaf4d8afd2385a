"""`clipcoco demo`: not implemented yet (issue 7)."""

from pipeline.errors import UserError


def command() -> None:
    """Run the whole pipeline on generated data, offline, on a CPU."""
    raise UserError("not implemented yet: issue 7")
