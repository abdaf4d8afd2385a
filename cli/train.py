"""`clipcoco train`: not implemented yet (issue 5)."""

from pipeline.errors import UserError


def command() -> None:
    """Train the image tower and heads on shards streamed through DALI."""
    raise UserError("not implemented yet: issue 5")
