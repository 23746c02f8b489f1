"""Processes and randomness: the torchrun/DDP process group, devices, and resumable RNG state.

Example:
    >>> env, device = setup("cpu")
    >>> env.rank, env.world, env.main, device.type
    (0, 1, True, 'cpu')
    >>> derive_seed(0, 1, 0) == derive_seed(0, 1, 0) != derive_seed(0, 2, 0)
    True
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distill.config import ConfigError


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    active: bool = False
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_pref: str) -> tuple[Dist, torch.device]:
    """Resolve the device and, under torchrun (RANK/WORLD_SIZE set), join the process group."""
    env = os.environ
    launched = "RANK" in env and "WORLD_SIZE" in env
    local_rank = int(env.get("LOCAL_RANK", "0")) if launched else 0
    if device_pref == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    elif device_pref == "cuda":
        device = torch.device(f"cuda:{local_rank}")
    else:
        try:
            device = torch.device(device_pref)
        except RuntimeError as exc:
            raise ConfigError(f"bad device {device_pref!r}: {exc}") from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not launched:
        return Dist(), device
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(int(env["RANK"]), int(env["WORLD_SIZE"]), True, owns), device


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from ``parts`` (e.g. seed, epoch, rank): resumed runs draw the same numbers."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def rng_state() -> dict[str, Any]:
    """Global RNG states in forms ``torch.load(weights_only=True)`` accepts."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
