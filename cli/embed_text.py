"""`clipcoco embed-text`: not implemented yet (issue 4)."""

from pipeline.errors import UserError


def command() -> None:
    """Run every caption through the frozen text tower once, into a Parquet cache."""
    raise UserError("not implemented yet: issue 4")
