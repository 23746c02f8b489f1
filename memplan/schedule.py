"""Memory-aware operator reordering: a topological order of a :class:`MemGraph` with a lower peak.

The bytes resident after a set ``S`` of ops has run depend on ``S`` alone (the storages written
in ``S``, or inputs, that are graph outputs or still have a reader outside ``S``), never on the
order inside ``S``. Serenity's dynamic programming (Ahn et al., MLSys 2020) exploits this: the
best peak of reaching ``S`` is memoized per set (a frontier state), and sets whose peak already
reaches the best known peak (from the heuristics below) are pruned. Here the sets are expanded
best first (A* with the peak as a bottleneck distance), so only sets that could still beat the
optimum are ever expanded. Two more facts keep the state space small:

- an op that allocates nothing can run as soon as it is ready without raising the peak (it only
  frees), so such ops are scheduled eagerly and never branch;
- an op every other op is an ancestor or a descendant of collapses the search to one state, so
  chains of residual blocks cost little.

When the exact search exceeds its budget, :func:`best_order` keeps the best of several heuristics
(program order, DFS, BFS, lowest-memory-first, a beam search) and improves it by re-solving windows
around the peak step exactly. Either way the result is checked to be a topological order of
:meth:`MemGraph.dependencies`; :func:`reorder_graph_module` executes a traced model in it.
"""

from __future__ import annotations

import copy
import heapq
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import networkx as nx
import torch.fx

from memplan.errors import MemplanError
from memplan.graph import MemGraph
from memplan.liveness import peak_of_order

MAX_STATES = 250_000  # sets the exact search may expand (about 0.7 KiB of memory each)


@dataclass(frozen=True)
class Schedule:
    """An op order (names) and its peak. ``method`` is ``"dp"`` when the peak is proven optimal,
    ``"heuristic"`` otherwise; ``source`` names what produced the order."""

    order: list[str]
    peak_bytes: int
    program_order_peak_bytes: int
    method: str
    seconds: float
    source: str = "dp"
    states: int = 0  # sets the exact search expanded

    @property
    def saving(self) -> float:
        """Fraction of the program order's peak saved."""
        return 1 - self.peak_bytes / self.program_order_peak_bytes if self.program_order_peak_bytes else 0.0


def _bits(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


@dataclass(slots=True)
class _State:
    peak: int
    cur: int  # bytes resident after the set has run
    ready: int  # ops whose predecessors all ran
    prev: int  # the set this one was reached from
    ops: tuple[int, ...]  # ops run from ``prev`` to here


class _Problem:
    """A MemGraph as bitmasks: ops are indices in program order."""

    def __init__(self, g: MemGraph) -> None:
        self.names = [o.name for o in g.ops]
        index = {n: i for i, n in enumerate(self.names)}
        self.dag = g.dependencies()
        n = len(self.names)
        self.preds = [0] * n
        for u, v in self.dag.edges:
            self.preds[index[v]] |= 1 << index[u]
        self.succs = [[index[v] for v in self.dag.successors(name)] for name in self.names]
        readers: dict[int, int] = {}
        written = {s for o in g.ops for s in o.writes}
        for i, o in enumerate(g.ops):
            for s in o.reads:
                readers[s] = readers.get(s, 0) | 1 << i
        counted = {s for s, st in g.storages.items() if st.is_input or s in written}
        self.size = {s: g.storages[s].nbytes for s in counted}
        self.readers = {s: readers.get(s, 0) for s in counted}
        self.output = {s for s in counted if g.storages[s].is_output}
        self.inputs = [s for s in counted if g.storages[s].is_input]
        self.writer = {s: i for i, o in enumerate(g.ops) for s in o.writes}
        self.alloc = [sum(self.size[s] for s in o.writes) for o in g.ops]
        self.free_ops = sum(1 << i for i, b in enumerate(self.alloc) if not b)
        # storages an op may free: those it touches that are not graph outputs
        self.frees = [
            [(self.size[s], self.readers[s]) for s in (*o.reads, *o.writes) if s in counted and s not in self.output]
            for o in g.ops
        ]
        self.unread_inputs = sum(self.size[s] for s in self.inputs if not self.readers[s] and s not in self.output)

    def resident(self, mask: int) -> int:
        """Bytes resident after the ops in ``mask`` ran (all inputs before the first op)."""
        if not mask:
            return sum(self.size[s] for s in self.inputs)
        return sum(
            size for s, size in self.size.items()
            if (s not in self.writer or mask >> self.writer[s] & 1)
            and (s in self.output or self.readers[s] & mask != self.readers[s])
        )

    def ready(self, mask: int, allowed: int) -> int:
        return sum(1 << v for v in _bits(allowed & ~mask) if self.preds[v] & mask == self.preds[v])

    def step(self, mask: int, cur: int, ready: int, v: int, allowed: int) -> tuple[int, int, int, int]:
        """Run ``v``: the new set, resident bytes, ready ops, and the bytes live during ``v``."""
        live = cur + self.alloc[v]
        new = mask | 1 << v
        resident = live if mask else live - self.unread_inputs
        for size, r in self.frees[v]:
            if r & new == r:
                resident -= size
        ready &= ~(1 << v)
        for w in self.succs[v]:
            if allowed >> w & 1 and self.preds[w] & new == self.preds[w]:
                ready |= 1 << w
        return new, resident, ready, live

    def close(self, st: _State, mask: int, allowed: int) -> tuple[int, _State]:
        """Eagerly run ready ops that allocate nothing (never raises the peak)."""
        while st.ready & self.free_ops:
            v = (st.ready & self.free_ops & -(st.ready & self.free_ops)).bit_length() - 1
            mask, st.cur, st.ready, live = self.step(mask, st.cur, st.ready, v, allowed)
            st.peak = max(st.peak, live)
            st.ops += (v,)
        return mask, st

    def initial(self, start: int, allowed: int) -> tuple[int, _State]:
        """The search's first state: ``start`` ran, ``allowed`` remains."""
        return self.close(_State(0, self.resident(start), self.ready(start, allowed), -1, ()), start, allowed)

    def successors(self, mask: int, st: _State, allowed: int, bound: int | None = None
                   ) -> Iterator[tuple[int, _State]]:
        """The states one ready op (plus the free ops it enables) away, skipping ops whose step
        alone reaches ``bound``."""
        for v in _bits(st.ready):
            if bound is not None and st.cur + self.alloc[v] >= bound:
                continue
            new, cur, ready, live = self.step(mask, st.cur, st.ready, v, allowed)
            yield self.close(_State(max(st.peak, live), cur, ready, mask, (v,)), new, allowed)

    def estimate(self, st: _State) -> int:
        """A lower bound of the peak of every completion of ``st``: its peak so far, and the
        cheapest next step (its resident bytes plus the smallest allocation of a ready op)."""
        return max(st.peak, st.cur + min((self.alloc[v] for v in _bits(st.ready)), default=0))

    def profile(self, order: Sequence[int]) -> list[int]:
        """Bytes live at each step of ``order`` (equals :func:`memplan.liveness.live_bytes`)."""
        mask, cur, out = 0, self.resident(0), []
        for v in order:
            mask, cur, _, live = self.step(mask, cur, 0, v, 0)
            out.append(live)
        return out


class _Budget(Exception):
    """The exact search ran out of states or time."""


@dataclass(frozen=True)
class _Found:
    peak: int | None  # None: no order beats the bound
    order: list[int]
    states: int  # sets expanded


def _trace(states: dict[int, _State], mask: int) -> list[int]:
    """The ops leading to ``mask``, following the states' back pointers."""
    parts = []
    while mask >= 0:
        st = states[mask]
        parts.append(st.ops)
        mask = st.prev
    return [v for ops in reversed(parts) for v in ops]


def _exact(
    p: _Problem, start: int, allowed: int, *, bound: int | None = None, max_states: int | None = None,
    deadline: float | None = None,
) -> _Found:
    """An order of minimum peak of the ops in ``allowed`` after those in ``start`` ran.

    A* over sets with the peak (a max, so monotone along a path) as distance and
    :meth:`_Problem.estimate` as the consistent heuristic: sets are expanded lowest estimate first
    (deepest first among equals), each once, so the first time the full set comes up its peak is
    optimal. Sets whose estimate reaches ``bound`` are pruned. Raises :class:`_Budget` past
    ``max_states`` expanded sets or ``deadline``.
    """
    mask, init = p.initial(start, allowed)
    target = start | allowed
    states = {mask: init}
    heap = [(init.peak, -mask.bit_count(), mask)]
    done: set[int] = set()
    while heap:
        peak, _, m = heapq.heappop(heap)
        if m in done:
            continue
        if m == target:
            return _Found(peak, _trace(states, m), len(done))
        done.add(m)
        if max_states is not None and len(done) > max_states or deadline and time.perf_counter() > deadline:
            raise _Budget(len(done))
        for new, nxt in p.successors(m, states[m], allowed, bound):
            if (bound is None or nxt.peak < bound) and new not in done and (
                    new not in states or nxt.peak < states[new].peak):
                key = p.estimate(nxt)
                if bound is None or key < bound:
                    states[new] = nxt
                    heapq.heappush(heap, (key, -new.bit_count(), new))
    return _Found(None, [], len(done))


def _beam(p: _Problem, width: int) -> list[int]:
    """A beam search: of the sets with the same number of ops, only the ``width`` best are expanded."""
    everything = (1 << len(p.names)) - 1
    mask, init = p.initial(0, everything)
    states = {mask: init}
    levels: dict[int, list[int]] = {mask.bit_count(): [mask]}
    for k in range(mask.bit_count(), len(p.names)):
        for m in sorted(levels.pop(k, []), key=lambda m: (states[m].peak, states[m].cur))[:width]:
            for new, nxt in p.successors(m, states[m], everything):
                if new not in states:
                    levels.setdefault(new.bit_count(), []).append(new)
                if new not in states or nxt.peak < states[new].peak:
                    states[new] = nxt
    return _trace(states, everything)


def is_topological(dag: nx.DiGraph, order: Sequence[str]) -> bool:
    """Whether ``order`` lists every node of ``dag`` once, each after all its predecessors.

    Example:
        >>> is_topological(nx.DiGraph([("a", "b")]), ["b", "a"])
        False
    """
    pos = {n: i for i, n in enumerate(order)}
    return len(pos) == len(order) == dag.number_of_nodes() and set(pos) == set(dag.nodes) and all(
        pos[u] < pos[v] for u, v in dag.edges
    )


def heuristic_orders(g: MemGraph, beam: int = 32) -> dict[str, list[str]]:
    """Candidate orders: program, DFS (reverse postorder), BFS (topological generations),
    lowest-memory-first (a beam of one) and a beam search over sets of ``beam`` states.

    Example:
        >>> import torch
        >>> from memplan.capture import capture
        >>> from memplan.graph import build_graph
        >>> g = build_graph(capture(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1)), torch.empty(1, 1, 4, 4)))
        >>> sorted(heuristic_orders(g))
        ['beam', 'bfs', 'dfs', 'lowest_memory', 'program']
    """
    p = _Problem(g)
    return {name: [p.names[v] for v in order] for name, order in _heuristics(p, beam).items()}


def _heuristics(p: _Problem, beam: int) -> dict[str, list[int]]:
    index = {n: i for i, n in enumerate(p.names)}
    out = {
        "program": list(range(len(p.names))),
        "dfs": [index[n] for n in reversed(list(nx.dfs_postorder_nodes(p.dag)))],
        "bfs": [v for gen in nx.topological_generations(p.dag) for v in sorted(index[n] for n in gen)],
    }
    for name, width in (("lowest_memory", 1), ("beam", beam)):
        out[name] = _beam(p, width)
    return out


def dp_order(g: MemGraph, *, max_states: int = MAX_STATES, time_limit: float = 10.0) -> list[str] | None:
    """An order of minimum peak by exact DP over sets of scheduled ops, or None past the budget.

    Example:
        >>> import torch
        >>> from memplan.capture import capture
        >>> from memplan.graph import build_graph
        >>> g = build_graph(capture(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1)), torch.empty(1, 1, 4, 4)))
        >>> dp_order(g)
        ['_0']
    """
    p = _Problem(g)
    try:
        found = _exact(p, 0, (1 << len(p.names)) - 1, max_states=max_states,
                       deadline=time.perf_counter() + time_limit)
    except _Budget:
        return None
    return [p.names[v] for v in found.order]


def _objective(profile: list[int]) -> tuple[int, int]:
    peak = max(profile, default=0)
    return peak, profile.count(peak)


def _improve(p: _Problem, order: list[int], deadline: float, window: int = 24, max_states: int = 20_000) -> list[int]:
    """Lower ``order``'s peak by re-solving windows of ops around its peak steps exactly."""
    best = _objective(p.profile(order))
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        profile = p.profile(order)
        peaks = [i for i, b in enumerate(profile) if b == best[0]]
        spans = [(max(0, i - window + 1 + shift), min(len(order), i + 1 + shift))
                 for i in peaks for shift in (0, window // 2, window - 1)]
        for lo, hi in spans:
            start = sum(1 << v for v in order[:lo])
            allowed = sum(1 << v for v in order[lo:hi])
            try:
                found = _exact(p, start, allowed, bound=best[0], max_states=max_states, deadline=deadline)
            except _Budget:
                continue
            if found.peak is None:
                continue
            candidate = order[:lo] + found.order + order[hi:]
            score = _objective(p.profile(candidate))
            if score < best:
                order, best, improved = candidate, score, True
                break
    return order


def best_order(
    g: MemGraph, *, time_limit: float = 10.0, max_states: int = MAX_STATES, beam: int = 32
) -> Schedule:
    """A topological order of ``g`` with a peak no higher than program order's, minimal if possible.

    The heuristics give an upper bound; the exact search, pruned by it, runs within ``max_states``
    expanded sets and 70% of ``time_limit`` (``method="dp"``: the peak is optimal); past that, the
    best heuristic order is improved locally for the rest of the time (``method="heuristic"``).

    Example:
        >>> from memplan.analyze import analyze
        >>> from memplan.zoo import create_model, default_input
        >>> r = analyze(create_model("resnet_tiny"), default_input("resnet_tiny"))
        >>> s = best_order(r.graph)
        >>> s.method, s.peak_bytes <= s.program_order_peak_bytes == r.peak_bytes
        ('dp', True)
    """
    t0 = time.perf_counter()
    p = _Problem(g)
    candidates = _heuristics(p, beam)
    scores = {name: _objective(p.profile(order)) for name, order in candidates.items()}
    source = min(scores, key=scores.__getitem__)
    order, peak = candidates[source], scores[source][0]
    method = "heuristic"
    try:
        found = _exact(p, 0, (1 << len(order)) - 1, bound=peak, max_states=max_states,
                       deadline=t0 + 0.7 * time_limit)
        method, states = "dp", found.states
        if found.peak is not None:
            order, source = found.order, "dp"
    except _Budget as budget:
        states = budget.args[0]
        improved = _improve(p, order, t0 + time_limit)
        if improved != order:
            order, source = improved, f"{source}+windows"
    names = [p.names[v] for v in order]
    if not is_topological(p.dag, names):
        raise MemplanError(f"internal error: the {source} order of {g.model_name} is not topological")
    return Schedule(names, peak_of_order(g, names), scores["program"][0], method, time.perf_counter() - t0,
                    source, states)


def reorder_graph_module(gm: torch.fx.GraphModule, order: Sequence[str]) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose nodes execute in ``order`` (names of call nodes, e.g. a
    :class:`Schedule`'s); nodes not named (placeholders, constants, shape arithmetic) run as early
    as their inputs allow. Raises :class:`MemplanError` if a node would run before its input.

    Example:
        >>> import torch
        >>> class Two(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x.sin() + x.cos()
        >>> gm = torch.fx.symbolic_trace(Two())
        >>> [n.name for n in reorder_graph_module(gm, ["cos", "sin", "add"]).graph.nodes]
        ['x', 'cos', 'sin', 'add', 'output']
    """
    graph = copy.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    missing = [n for n in order if n not in nodes]
    if missing:
        raise MemplanError(f"the order names nodes the graph does not have: {missing[:5]}")
    named = set(order)
    placed: list[torch.fx.Node] = []
    done: set[torch.fx.Node] = set()

    def place(n: torch.fx.Node) -> None:
        if n in done:
            return
        for a in n.all_input_nodes:
            if a not in done and a.name in named:
                raise MemplanError(f"node '{n.name}' is ordered before its input '{a.name}'")
            place(a)
        done.add(n)
        placed.append(n)

    for n in graph.nodes:
        if n.op == "placeholder":
            place(n)
    for name in order:
        place(nodes[name])
    for n in list(graph.nodes):
        place(n)
    cursor = placed[0]
    for n in placed[1:]:
        cursor.append(n)
        cursor = n
    graph.lint()
    return torch.fx.GraphModule(gm, graph)


__all__ = ["Schedule", "best_order", "dp_order", "heuristic_orders", "is_topological", "reorder_graph_module"]
