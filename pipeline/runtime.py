"""Where a process runs: the one device rule and torchrun's process group, for every command.

Every command that takes `--device` (train, eval, embed-text, search, bench) resolves it here, so they all
accept the same values: `auto` (a GPU when one is visible, else the CPU), `cpu`, `cuda` (this process's GPU:
`cuda:LOCAL_RANK` under torchrun, GPU 0 otherwise) and `cuda:N` (GPU N, one process only).

    with distributed("auto") as rt:       # joins torchrun's group when WORLD_SIZE > 1, leaves it at the end
        ...rt.device, rt.rank, rt.world_size...
        rows = gather_rows(local_rows)    # every rank's rows, in rank order

Commands that write a folder hold its lock in the writing process only (`main_locked`).
"""

import os
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import UserError
from pipeline.files import locked

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def is_device_name(device: str) -> bool:
    """Whether `device` is one of the accepted spellings (checked without looking for a GPU)."""
    return isinstance(device, str) and _DEVICE.fullmatch(device) is not None


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def main_locked(folder: Path, what: str) -> AbstractContextManager:
    """`files.locked(folder, what)` in the process that writes `folder` (rank 0 under torchrun), nothing elsewhere:
    the other ranks' own locks would conflict with rank 0's. Taken before the process group is joined, from torchrun's
    RANK: a refused rank 0 exits with its message, and torchrun then stops the other ranks."""
    return locked(folder, what) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device `device` names in this process (see the module docstring for the rule)."""
    if not is_device_name(device):
        raise UserError(f"--device {device!r}: pass {DEVICE_CHOICES}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"--device {device} but torch sees no CUDA GPU: pass --device cpu (or auto)")
    if device.startswith("cuda:"):
        if world_size() > 1:
            raise UserError(f"--device {device} under torchrun would put every process on one GPU: pass --device "
                            "cuda (or auto), and each process takes the GPU of its LOCAL_RANK")
        index = int(device.partition(":")[2])
    else:
        index = int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: GPU {index} does not exist ({torch.cuda.device_count()} visible)")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    host_group: Any = None  # a gloo group for host-side flags (`any_rank`) when the default group is NCCL

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0


@contextmanager
def distributed(device: str = "auto") -> Iterator[Runtime]:
    """Resolve `device`; under torchrun join its process group (NCCL on CUDA, gloo on a CPU) and leave it after.

    A group that already exists (a caller joined it) is used and left in place.
    """
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)  # NCCL collectives and DALI run on the current device
    owns = world_size() > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    try:
        if dist.is_initialized():
            # A flag all-reduced through NCCL would make the host wait for the GPU every step; gloo does not.
            host = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
            yield Runtime(resolved, dist.get_rank(), dist.get_world_size(), host)
        else:
            yield Runtime(resolved, 0, 1)
    finally:
        if owns:
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def gather_objects(obj) -> list:
    """Every rank's `obj` (any picklable value), in rank order; [obj] in a single process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows concatenated in rank order (the counts may differ by rank); `local` in a single process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=local.device))
    longest = int(max(s.item() for s in sizes))
    if longest == 0:
        return local
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    parts = gather_equal(padded).split(longest)  # all_gather needs equal shapes, hence the padding, trimmed here
    return torch.cat([p[: int(n.item())] for p, n in zip(parts, sizes, strict=True)])


def gather_equal(local: torch.Tensor) -> torch.Tensor:
    """Every rank's `local` (the same shape on each) concatenated in rank order, without gradients: one all_gather,
    no size exchange (the loss calls it every step); `local` in a single process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def any_rank(flag: bool, env: Runtime) -> bool:
    """Whether `flag` holds on any rank (one all-reduce on the host; the flag itself in a single process), so that
    every rank takes the same branch: a signal may reach one rank only."""
    if env.world_size == 1:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=env.host_group)
    return bool(value.item())
