"""The stateful parts of a training run that are not the model or the optimizer (clip/optim.py): the random
streams and the per-rank positions. Each has `state_dict()` / `load_state_dict()`; clip/train.py's `Run.add` makes
one a part of the run, saved in every checkpoint under its name and restored on resume.

Under torchrun each rank holds its own random streams, loader position and extra-negative position: `state_dict` is
a collective (every rank calls it, in the same order) that returns every rank's state, and `load_state_dict` takes
this rank's back.
"""

from typing import Any, Protocol

import torch
from torch import Tensor

from pipeline.runtime import gather_objects


class Stateful(Protocol):
    """A part of a run: what `state_dict` returns (plain values and tensors: checkpoints load with weights_only=True)
    `load_state_dict` takes back."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class PerRank:
    """A part each rank holds its own of (its loader or extra-negative position): saved as every rank's state in rank
    order, restored from this rank's."""

    def __init__(self, part: Stateful, rank: int) -> None:
        self.part, self.rank = part, rank

    def state_dict(self) -> list:
        return gather_objects(self.part.state_dict())

    def load_state_dict(self, states: list) -> None:
        self.part.load_state_dict(states[self.rank])


def rank_state(states: Tensor, rank: int) -> Tensor:
    """This rank's generator state from a checkpoint's [world, N] stack (an older checkpoint's one global state is
    every rank's), as a tensor of its own: `Generator.set_state` misreads a view that starts inside its storage, as
    every row but the first does ("Invalid mt19937 state", or a crash)."""
    return (states[rank] if states.ndim == 2 else states).clone()


class RandomStreams:
    """This rank's random streams as one part: torch's global generator and the caption generator, each saved as the
    [world, N] stack of every rank's state."""

    def __init__(self, caption_rng: torch.Generator, rank: int) -> None:
        self.caption_rng, self.rank = caption_rng, rank

    def state_dict(self) -> dict:
        return {"torch": torch.stack(gather_objects(torch.get_rng_state())),
                "captions": torch.stack(gather_objects(self.caption_rng.get_state()))}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(rank_state(state["torch"], self.rank))
        self.caption_rng.set_state(rank_state(state["captions"], self.rank))
