"""Static arena planning: an offset for every storage so that storages live at the same time never
share an address (docs/definitions.md §1).

Each strategy turns lifetimes into offsets. The greedy strategies differ only in the order they
place storages in; every storage then goes into the tightest gap left between the already placed
storages whose lifetimes overlap its own (best fit), or on top of them.

- ``greedy_by_size``: largest first (TFLite's and TVM's default),
- ``greedy_by_breadth``: storages of the widest steps first (TFLite's GreedyByBreadth),
- ``greedy_by_conflicts``: most conflicting bytes first (TVM's greedy_by_conflicts),
- ``local_search``: hill climbing over placement orders from the best greedy one (TVM's hill_climb).

:func:`plan_arena` runs them all and keeps the smallest arena; :func:`check_plan` validates a plan.
Sizes are rounded up to the alignment first, and the lower bound is taken over those aligned sizes,
so ``arena_bytes / lower_bound_bytes`` measures fragmentation alone.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from memplan.errors import MemplanError
from memplan.liveness import Lifetime, live_bytes

Strategy = Callable[[Sequence[Lifetime]], dict[int, int]]  # aligned lifetimes -> offsets


class PlanError(MemplanError):
    """An arena plan is invalid: overlapping live storages, a missing or misaligned offset."""


@dataclass(frozen=True)
class ArenaPlan:
    """Offsets (bytes from the arena base) of every storage, keyed by storage id.

    ``sizes`` are the aligned sizes the plan reserves; ``lower_bound_bytes`` is the largest sum of
    aligned sizes live at one step, so no plan can be smaller. ``candidates`` holds the arena each
    strategy reached.
    """

    offsets: dict[int, int]
    sizes: dict[int, int]
    arena_bytes: int
    lower_bound_bytes: int
    alignment: int
    strategy: str
    seconds: float = 0.0
    candidates: dict[str, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Fragmentation: arena bytes over the lower bound (1.0 is optimal)."""
        return self.arena_bytes / self.lower_bound_bytes if self.lower_bound_bytes else 1.0


def align_up(n: int, alignment: int) -> int:
    """``n`` rounded up to a multiple of ``alignment``.

    Example:
        >>> align_up(100, 64), align_up(128, 64), align_up(0, 64)
        (128, 128, 0)
    """
    return -(-n // alignment) * alignment


def _conflicts(lts: Sequence[Lifetime]) -> list[list[int]]:
    """For each lifetime, the indices of the lifetimes overlapping it in time (a sweep by start)."""
    by_start = sorted(range(len(lts)), key=lambda i: lts[i].start)
    out: list[list[int]] = [[] for _ in lts]
    active: list[int] = []
    for i in by_start:
        active = [j for j in active if lts[j].end >= lts[i].start]
        for j in active:
            out[i].append(j)
            out[j].append(i)
        active.append(i)
    return out


def _place(lts: Sequence[Lifetime], priority: Iterable[int], conflicts: list[list[int]]) -> list[int]:
    """Offsets (by index) placing lifetimes in ``priority`` order, each in the tightest fitting gap."""
    offsets = [-1] * len(lts)
    for i in priority:
        size = lts[i].size
        if size == 0:
            offsets[i] = 0
            continue
        busy = sorted((offsets[j], offsets[j] + lts[j].size) for j in conflicts[i] if offsets[j] >= 0
                      and lts[j].size)
        best, best_gap, top = None, None, 0
        for lo, hi in busy:
            gap = lo - top
            if gap >= size and (best_gap is None or gap < best_gap):
                best, best_gap = top, gap
            top = max(top, hi)
        offsets[i] = top if best is None else best
    return offsets


def _arena(lts: Sequence[Lifetime], offsets: Sequence[int]) -> int:
    return max((o + lt.size for o, lt in zip(offsets, lts)), default=0)


def _by_size(lts: Sequence[Lifetime], _: list[list[int]]) -> list[int]:
    return sorted(range(len(lts)), key=lambda i: (-lts[i].size, lts[i].start - lts[i].end, lts[i].start))


def _by_conflicts(lts: Sequence[Lifetime], conflicts: list[list[int]]) -> list[int]:
    load = [lts[i].size + sum(lts[j].size for j in c) for i, c in enumerate(conflicts)]
    return sorted(range(len(lts)), key=lambda i: (-load[i], -lts[i].size, lts[i].start))


def _by_breadth(lts: Sequence[Lifetime], _: list[list[int]]) -> list[int]:
    steps = max((lt.end for lt in lts), default=-1) + 1
    breadth = live_bytes(lts, steps)
    widest = [max(breadth[lt.start:lt.end + 1]) for lt in lts]
    return sorted(range(len(lts)), key=lambda i: (-widest[i], -lts[i].size, lts[i].start))


_PRIORITIES = {"greedy_by_size": _by_size, "greedy_by_breadth": _by_breadth, "greedy_by_conflicts": _by_conflicts}


def _greedy(priority: Callable[[Sequence[Lifetime], list[list[int]]], list[int]]) -> Strategy:
    def strategy(lts: Sequence[Lifetime]) -> dict[int, int]:
        conflicts = _conflicts(lts)
        offsets = _place(lts, priority(lts, conflicts), conflicts)
        return {lt.storage: o for lt, o in zip(lts, offsets)}

    strategy.__doc__ = f"Best-fit placement in the order of ``{priority.__name__}``."
    return strategy


def local_search(lts: Sequence[Lifetime], iterations: int = 300, seed: int = 0) -> dict[int, int]:
    """Hill climbing over placement orders, from the best greedy order.

    Each step moves one storage that reaches the arena's top to an earlier, random place in the
    order and keeps the result if the arena does not grow. Stops early at the lower bound.
    """
    conflicts = _conflicts(lts)
    lb = max(live_bytes(lts, max((lt.end for lt in lts), default=-1) + 1), default=0)
    rng = random.Random(seed)
    best_order, best_offsets, best = [], [], -1
    for priority in _PRIORITIES.values():
        order = priority(lts, conflicts)
        offsets = _place(lts, order, conflicts)
        if best < 0 or _arena(lts, offsets) < best:
            best_order, best_offsets, best = order, offsets, _arena(lts, offsets)
    for _ in range(iterations):
        if best <= lb:
            break
        top = [k for k, i in enumerate(best_order) if best_offsets[i] + lts[i].size == best]
        k = rng.choice(top)
        order = list(best_order)
        order.insert(rng.randrange(k + 1), order.pop(k))
        offsets = _place(lts, order, conflicts)
        if _arena(lts, offsets) <= best:
            best_order, best_offsets, best = order, offsets, _arena(lts, offsets)
    return {lt.storage: o for lt, o in zip(lts, best_offsets)}


STRATEGIES: dict[str, Strategy] = {
    **{name: _greedy(priority) for name, priority in _PRIORITIES.items()},
    "local_search": local_search,
}


def plan_arena(
    lifetimes: Sequence[Lifetime], alignment: int = 64, strategies: Sequence[str] | None = None
) -> ArenaPlan:
    """Plan offsets with every strategy (or those named) and return the smallest valid plan.

    Example:
        >>> from memplan.liveness import Lifetime
        >>> lts = [Lifetime(0, 100, 0, 1), Lifetime(1, 64, 1, 2), Lifetime(2, 128, 2, 3)]
        >>> plan = plan_arena(lts)
        >>> plan.arena_bytes, plan.lower_bound_bytes, plan.strategy, plan.offsets
        (192, 192, 'greedy_by_size', {0: 0, 1: 128, 2: 0})
    """
    if alignment < 1:
        raise PlanError(f"alignment must be a positive number of bytes, got {alignment}")
    names = list(STRATEGIES) if strategies is None else list(strategies)
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise PlanError(f"unknown arena strategy {unknown or names} (known: {', '.join(STRATEGIES)})")
    t0 = time.perf_counter()
    aligned = [replace(lt, size=align_up(lt.size, alignment)) for lt in lifetimes]
    sizes = {lt.storage: lt.size for lt in aligned}
    lb = max(live_bytes(aligned, max((lt.end for lt in aligned), default=-1) + 1), default=0)
    best: ArenaPlan | None = None
    candidates: dict[str, int] = {}
    for name in names:
        offsets = STRATEGIES[name](aligned)
        plan = ArenaPlan(offsets, sizes, max((offsets[s] + n for s, n in sizes.items()), default=0), lb,
                         alignment, name)
        check_plan(plan, lifetimes)
        candidates[name] = plan.arena_bytes
        if best is None or plan.arena_bytes < best.arena_bytes:
            best = plan
        if best.arena_bytes == lb and strategies is None:
            break  # optimal; the remaining strategies cannot do better
    assert best is not None
    return replace(best, seconds=time.perf_counter() - t0, candidates=candidates)


def check_plan(plan: ArenaPlan, lifetimes: Sequence[Lifetime]) -> None:
    """Raise :class:`PlanError` unless every storage has an aligned offset inside the arena, reserves
    at least its size, and no two storages live at the same step share an address.

    Example:
        >>> from memplan.liveness import Lifetime
        >>> lts = [Lifetime(0, 64, 0, 1), Lifetime(1, 64, 1, 2)]
        >>> check_plan(ArenaPlan({0: 0, 1: 0}, {0: 64, 1: 64}, 64, 128, 64, "manual"), lts)
        Traceback (most recent call last):
        ...
        memplan.planner.PlanError: storages 0 [0, 64) and 1 [0, 64) overlap in memory while both live at step 1
    """
    for lt in lifetimes:
        s = lt.storage
        if s not in plan.offsets or s not in plan.sizes:
            raise PlanError(f"storage {s} has no offset in the plan")
        off, size = plan.offsets[s], plan.sizes[s]
        if size < lt.size:
            raise PlanError(f"storage {s} reserves {size} bytes but needs {lt.size}")
        if off < 0 or off % plan.alignment or off + size > plan.arena_bytes:
            raise PlanError(f"storage {s} at offset {off} (+{size}) is misaligned or outside the "
                            f"{plan.arena_bytes}-byte arena (alignment {plan.alignment})")
    used = [lt for lt in lifetimes if lt.size]
    conflicts = _conflicts(used)
    for i, c in enumerate(conflicts):
        a = used[i]
        a0, a1 = plan.offsets[a.storage], plan.offsets[a.storage] + plan.sizes[a.storage]
        for j in c:
            b = used[j]
            b0, b1 = plan.offsets[b.storage], plan.offsets[b.storage] + plan.sizes[b.storage]
            if j > i and a0 < b1 and b0 < a1:
                first, second = sorted([(a.storage, a0, a1), (b.storage, b0, b1)])
                raise PlanError(f"storages {first[0]} [{first[1]}, {first[2]}) and {second[0]} "
                                f"[{second[1]}, {second[2]}) overlap in memory while both live at step "
                                f"{max(a.start, b.start)}")


__all__ = ["STRATEGIES", "ArenaPlan", "PlanError", "align_up", "check_plan", "local_search", "plan_arena"]
