"""The optimizer and learning-rate schedule of `clipcoco train` (and `clipcoco bench train`), and the two as
components of a run: each saves its state into a checkpoint and takes it back on resume (clip/train.py's `Run`).

AdamW with weight decay on conv and linear weights only; the lr warms up linearly to `optim.lr`, then follows a
cosine to 0 at the run's last step. A resume keeps the saved moments and step counts but trains with the new config's
hyperparameters and schedule (peak lr, warmup, total), so `--lr` or `--steps` act on a resumed run.
"""

import math

import torch
from torch import nn

from clip.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only: decaying biases, norm scales or the temperature only hurts.
    Frozen parameters (a locked trunk) are left out."""
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps)


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Multiplier of the peak lr at 0-based `step`: linear warmup to 1, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, *, warmup: int, total: int,
                   step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule, at `step` (a resumed run's: each param group's `initial_lr` is the peak it scales)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup=warmup, total=total),
                                             last_epoch=step - 1)


class OptimizerState:
    """The optimizer as a run component: saved whole; restored with its moments and step counts but this config's
    hyperparameters (lr, weight decay, betas, eps), since `Optimizer.load_state_dict` alone would bring back the
    saved run's and a resume with a new --lr or --weight-decay would silently train with the old ones."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state)
        for group, fresh in zip(self.optimizer.param_groups, settings, strict=True):
            group.update(fresh, initial_lr=fresh["lr"])  # initial_lr: the peak the rebuilt schedule scales


class Schedule:
    """The lr schedule as a run component. Restoring rebuilds it at the step the saved one reached rather than
    loading the saved scheduler, whose base lrs are the old run's: this config's peak lr, warmup and total apply.
    Restore the optimizer first (its groups then hold this config's peak as `initial_lr`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, warmup: int, total: int) -> None:
        self.optimizer, self.warmup, self.total = optimizer, warmup, total
        self.scheduler = make_scheduler(optimizer, warmup=warmup, total=total)

    def step(self) -> None:
        self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler = make_scheduler(self.optimizer, warmup=self.warmup, total=self.total,
                                        step=int(state["last_epoch"]))
