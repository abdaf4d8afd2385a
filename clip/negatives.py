"""Extra text negatives for `clipcoco train --extra-negatives N`: captions of other images, drawn from the training
text cache each step and pushed through the current text head (exact, never a stale queue).

Input: the training `TextCache`, the per-rank count, the run's seed and this process's rank. Output per step: the
rows' cached vectors [count, D] and their image ids [count] (the loss masks those that belong to an image of the
global batch). Each rank reads consecutive pieces of seeded permutations of all cache rows, a new permutation per
pass (`numpy.random.default_rng([seed, rank, pass])`), so draws are without replacement within a pass, cost O(count)
per step, and the stream's position (pass, offset) is all a checkpoint needs to resume it exactly.
"""

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.text_cache import TextCache


class ExtraNegatives:
    def __init__(self, cache: TextCache, count: int, *, seed: int, rank: int) -> None:
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
