"""`clipcoco search`: not implemented yet (issue 6)."""

from pipeline.errors import UserError


def command() -> None:
    """Search the eval images of a run with a text query."""
    raise UserError("not implemented yet: issue 6")
