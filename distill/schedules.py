"""Learning-rate schedules by name (``schedule: onecycle | cosine | step``); schedulers step every batch.

Register more with :data:`SCHEDULES` (``factory(optimizer, config, steps_per_epoch) -> LRScheduler``).

Example:
    >>> import torch
    >>> from distill.config import TrainConfig
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    >>> type(SCHEDULES["cosine"](opt, TrainConfig(epochs=2), 10)).__name__
    'CosineAnnealingLR'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, MultiStepLR, OneCycleLR

from memplan.registry import Registry

if TYPE_CHECKING:
    from distill.config import TrainConfig

ScheduleFactory = Callable[[torch.optim.Optimizer, "TrainConfig", int], LRScheduler]
SCHEDULES: Registry[ScheduleFactory] = Registry("schedule")


@SCHEDULES.register("onecycle")
def _onecycle(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> LRScheduler:
    return OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps, cycle_momentum=False)


@SCHEDULES.register("cosine")
def _cosine(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> LRScheduler:
    return CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps)


@SCHEDULES.register("step")
def _step(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> LRScheduler:
    milestones = cfg.milestones or [cfg.epochs // 2, (3 * cfg.epochs) // 4]
    return MultiStepLR(optimizer, milestones=[m * steps for m in milestones], gamma=cfg.gamma)
