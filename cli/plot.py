"""`clipcoco plot`: not implemented yet (issue 6)."""

from pipeline.errors import UserError


def command() -> None:
    """Plot a run's training curves to a PNG."""
    raise UserError("not implemented yet: issue 6")
