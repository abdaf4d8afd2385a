"""`clipcoco shards`: not implemented yet (issue 3)."""

from pipeline.errors import UserError


def command() -> None:
    """Pack COCO images and captions into WebDataset shards with DALI indexes."""
    raise UserError("not implemented yet: issue 3")
