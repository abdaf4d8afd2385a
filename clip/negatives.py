"""Extra text negatives for `clipcoco train --extra-negatives N`: captions of other images, drawn from the training
text cache each step and pushed through the current text head (exact, never a stale queue).

Input: the training `TextCache`, the per-rank count (all ranks' together at most the cache's rows), the run's seed,
this process's rank and the process count. Output per step: the rows' cached vectors [count, D] and their image ids
[count] (the loss masks those that belong to an image of the global batch). Each rank reads consecutive pieces of
seeded permutations of all cache rows, a new permutation per pass (`numpy.random.default_rng([seed, rank, pass])`), so
draws are without replacement within a pass, cost O(count) per step, and the stream's position (pass, offset) is all
a checkpoint needs to resume it exactly.
"""

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.text_cache import TextCache


class ExtraNegatives:
    def __init__(self, cache: TextCache, count: int, *, seed: int, rank: int, world_size: int) -> None:
        """`count` rows per step for this rank, `world_size` ranks drawing as many each."""
        if count * world_size > len(cache):
            # Refused, not capped: a run does what its config.yaml says. More extras than captions would repeat
            # each of them in every step (a preset's 16384 of a 400-caption cache: ~41 times), at that many times
            # the memory and compute, for no new negative.
            most = len(cache) // world_size * world_size
            raise UserError(f"--extra-negatives {count * world_size} is more than the {len(cache):,} captions of the "
                            f"text cache {cache.path}, so every step would repeat them: pass at most {most:,}"
                            + (f" (a multiple of the {world_size} processes)" if world_size > 1 else ""))
        self.cache, self.count, self.seed, self.rank = cache, count, seed, rank
        self.cycle, self.position = 0, 0
        self._order: np.ndarray | None = None

    def _permutation(self) -> np.ndarray:
        if self._order is None:
            self._order = np.random.default_rng([self.seed, self.rank, self.cycle]).permutation(len(self.cache))
        return self._order

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `count` rows: ([count, D] float16 vectors, [count] int64 image ids)."""
        pieces, needed = [], self.count
        while needed:
            order = self._permutation()
            piece = order[self.position: self.position + needed]
            pieces.append(piece)
            needed -= len(piece)
            self.position += len(piece)
            if self.position == len(order):
                self.cycle, self.position, self._order = self.cycle + 1, 0, None
        return self.cache.rows(torch.from_numpy(np.concatenate(pieces)))

    def _signature(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "count": self.count, "rows": len(self.cache)}

    def state_dict(self) -> dict:
        return {"signature": self._signature(), "cycle": self.cycle, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state["signature"] != self._signature():
            raise UserError(f"the saved extra-negative stream is for {state['signature']}, this run has "
                            f"{self._signature()}: resume with the same --extra-negatives, seed, processes and text "
                            "cache, or start a new run with --overwrite")
        self.cycle, self.position, self._order = int(state["cycle"]), int(state["position"]), None
