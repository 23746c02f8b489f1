"""Liveness: when each storage is live for a given op order, and the live bytes at every step.

A storage is live from the step of the op that allocates it (step 0 for graph inputs) to the step
of its last reader; graph outputs live to the last step (docs/definitions.md §1). The lower bound of an order
is the maximum over steps of the live bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from memplan.graph import MemGraph


@dataclass(frozen=True)
class Lifetime:
    """A storage's size and its live interval [start, end] in steps (both inclusive)."""

    storage: int
    size: int
    start: int
    end: int


def lifetimes(g: MemGraph, order: Sequence[str] | None = None) -> list[Lifetime]:
    """Live interval of every storage of ``g`` under ``order`` (op names; default program order).

    Example:
        >>> import torch
        >>> from memplan.capture import capture
        >>> from memplan.graph import build_graph
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.Conv2d(2, 2, 1))
        >>> g = build_graph(capture(net, torch.empty(1, 1, 4, 4)))
        >>> [(lt.size, lt.start, lt.end) for lt in lifetimes(g)]
        [(64, 0, 0), (128, 0, 1), (128, 1, 1)]
    """
    names = [o.name for o in g.ops] if order is None else list(order)
    pos = {name: i for i, name in enumerate(names)}
    if len(pos) != len(g.ops) or set(pos) != {o.name for o in g.ops}:
        raise ValueError("order must list every op of the graph exactly once")
    last = len(names) - 1
    start = {s: 0 for s, st in g.storages.items() if st.is_input}
    end = dict(start)
    for o in g.ops:
        p = pos[o.name]
        for s in o.writes:
            start[s] = end[s] = p
    for o in g.ops:
        p = pos[o.name]
        for s in o.reads:
            end[s] = max(end.get(s, p), p)
    out = []
    for s, st in g.storages.items():
        if s not in start:
            continue
        e = max(0, last) if st.is_output else end[s]
        out.append(Lifetime(s, st.nbytes, start[s], e))
    return out


def live_bytes(lts: Sequence[Lifetime], steps: int) -> list[int]:
    """Bytes live at each of ``steps`` steps (a difference array over the intervals)."""
    diff = [0] * (steps + 1)
    for lt in lts:
        diff[lt.start] += lt.size
        diff[lt.end + 1] -= lt.size
    acc, out = 0, []
    for d in diff[:steps]:
        acc += d
        out.append(acc)
    return out


def peak_of_order(g: MemGraph, order: Sequence[str] | None = None) -> int:
    """The lower bound (max live bytes) of ``order``."""
    return max(live_bytes(lifetimes(g, order), len(g.ops)), default=0)
