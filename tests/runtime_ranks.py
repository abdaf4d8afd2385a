"""Run under torchrun (tests/test_runtime.py): each rank joins through `distributed`, gathers and writes what it got."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.runtime import any_rank, barrier, distributed, gather_objects, gather_rows

out = Path(sys.argv[1])
with distributed("auto") as rt:
    joined = dist.is_initialized()
    # Rank r holds r + 1 rows of value r: unequal counts, as an eval split over ranks has.
    rows = gather_rows(torch.full((rt.rank + 1, 2), float(rt.rank)))
    objects = gather_objects({"rank": rt.rank})
    # A stop signal that reached rank 1 only: every rank must see it (and a flag held nowhere, by none).
    stops = [any_rank(rt.rank == 1, rt), any_rank(False, rt)]
    barrier()
left = not dist.is_initialized()
(out / f"rank{rt.rank}.json").write_text(json.dumps({
    "rank": rt.rank, "world_size": rt.world_size, "device": str(rt.device), "joined": joined, "left": left,
    "rows": rows.tolist(), "objects": objects, "stops": stops}))
