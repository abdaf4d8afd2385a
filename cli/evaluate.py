"""`clipcoco eval`: not implemented yet (issue 6)."""

from pipeline.errors import UserError


def command() -> None:
    """Score a run with COCO image-text retrieval Recall@1/5/10."""
    raise UserError("not implemented yet: issue 6")
