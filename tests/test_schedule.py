"""Reordering: the exact DP is optimal (brute force on small DAGs) and never worse than a heuristic,
every order is topological, and a reordered traced model computes identical outputs."""

import itertools
import json
import textwrap

import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from memplan.analyze import report_from_graph
from memplan.capture import capture
from memplan.cli import main
from memplan.errors import MemplanError
from memplan.graph import MemGraph, Op, Storage, build_graph
from memplan.liveness import live_bytes, peak_of_order
from memplan.schedule import best_order, dp_order, heuristic_orders, is_topological, reorder_graph_module


@st.composite
def mem_graphs(draw, max_ops=10):
    """A random DAG of ops: each reads its predecessors' outputs (or the input), allocates a storage
    of random size or aliases its first input's, and sometimes updates its input in place."""
    n = draw(st.integers(1, max_ops))
    storages = {0: Storage(0, draw(st.integers(1, 500)), (1,), "float32", None, "", is_input=True)}
    out_of: list[int] = []
    ops = []
    for i in range(n):
        preds = sorted(draw(st.sets(st.integers(0, i - 1), max_size=3))) if i else []
        reads = tuple(sorted({out_of[p] for p in preds})) or (0,)
        kind = draw(st.sampled_from(["alloc", "alloc", "alloc", "alias", "inplace"]))
        if kind == "alloc" or reads == (0,):
            s = len(storages)
            storages[s] = Storage(s, draw(st.integers(0, 1000)), (1,), "float32", f"op{i}", "")
            writes, out = (s,), s
        else:
            writes, out = (), reads[0]
        ops.append(Op(f"op{i}", "f", "other", "", reads, writes, (out,) if kind == "inplace" and not writes else (),
                      deps=tuple(f"op{p}" for p in preds)))
        out_of.append(out)
    used = {s for o in ops for s in o.reads}
    for i, s in enumerate(out_of):
        if s not in used or draw(st.booleans()) and i == n - 1:
            storages[s].is_output = True
    return MemGraph(ops, storages)


def brute_force_peak(g, limit=5040):
    orders = itertools.islice(nx.all_topological_sorts(g.dependencies()), limit)
    return min(peak_of_order(g, o) for o in orders)


@settings(max_examples=40, deadline=None)
@given(mem_graphs(max_ops=7))
def test_dp_is_optimal_on_small_dags(g):
    order = dp_order(g)
    assert is_topological(g.dependencies(), order)
    assert peak_of_order(g, order) == brute_force_peak(g)


@settings(max_examples=40, deadline=None)
@given(mem_graphs(max_ops=14))
def test_dp_never_worse_than_any_heuristic(g):
    dag = g.dependencies()
    dp = peak_of_order(g, dp_order(g))
    for name, order in heuristic_orders(g).items():
        assert is_topological(dag, order), name
        assert dp <= peak_of_order(g, order), name
    s = best_order(g)
    assert s.method == "dp" and is_topological(dag, s.order)
    assert s.peak_bytes == dp == report_from_graph(g, order=s.order).peak_bytes
    assert s.program_order_peak_bytes == peak_of_order(g) >= s.peak_bytes


@settings(max_examples=15, deadline=None)
@given(mem_graphs(max_ops=14))
def test_heuristic_fallback_is_topological_and_no_worse(g):
    s = best_order(g, max_states=1, time_limit=0.5)
    assert is_topological(g.dependencies(), s.order)
    assert s.peak_bytes <= min(peak_of_order(g, o) for o in heuristic_orders(g).values())


class Diamond(nn.Module):
    """Program order runs the wide branch y first; running the x1 -> x2 branch first is better."""

    def __init__(self):
        super().__init__()
        self.y = nn.Conv2d(4, 24, 1)
        self.x1 = nn.Conv2d(4, 32, 1)
        self.x2 = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        y = self.y(x)
        z = self.x2(self.x1(x))
        return torch.cat([y, z], 1)


def test_diamond_best_order_differs_from_program_order():
    torch.manual_seed(0)
    model, x = Diamond().eval(), torch.randn(1, 4, 8, 8)
    cg = capture(model, x)
    g = build_graph(cg)
    s = best_order(g)
    # 256 bytes per channel: program order peaks at x1 with input + y + x1 = (4 + 24 + 32) * 256;
    # the optimum peaks at the concat: y + x2 + output = (24 + 4 + 28) * 256
    assert (s.program_order_peak_bytes, s.peak_bytes, s.method) == (60 * 256, 56 * 256, "dp")
    assert s.order == ["x1", "x2", "y", "cat"] != [o.name for o in g.ops]
    reordered = reorder_graph_module(cg.gm, s.order)
    assert [n.name for n in reordered.graph.nodes if n.op == "call_module"] == ["x1", "x2", "y"]
    with torch.no_grad():
        assert torch.equal(reordered(x), model(x))


class Branchy(nn.Module):
    """Parallel branches with in-place ReLUs, shape arithmetic and a residual sum."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, c, 1), nn.ReLU(inplace=True), nn.Conv2d(c, 8, 3, padding=1))
            for c in (4, 16, 32)
        )
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x).relu_()
        outs = [b(x) for b in self.branches]
        y = outs[0] + outs[1]
        y += outs[2] * x
        return self.head(y.mean((2, 3)).view(x.size(0), -1))


@pytest.mark.parametrize("form", ["deploy", "as-written"])
def test_reordered_model_computes_identical_outputs(form):
    torch.manual_seed(0)
    model, x = Branchy().eval(), torch.randn(2, 3, 16, 16)
    cg = capture(model, x)
    g = build_graph(cg, form=form)
    s = best_order(g)
    assert s.peak_bytes < s.program_order_peak_bytes and s.order != [o.name for o in g.ops]
    # the timeline of the new order matches the peak the search promised
    assert max(live_bytes(report_from_graph(g, order=s.order).lifetimes, len(s.order))) == s.peak_bytes
    with torch.no_grad():
        expected = model(x)
        for order in [s.order, *heuristic_orders(g).values()]:
            assert torch.equal(reorder_graph_module(cg.gm, order)(x), expected)


def test_reorder_rejects_non_topological_order():
    cg = capture(Diamond(), torch.randn(1, 4, 8, 8))
    with pytest.raises(MemplanError, match="ordered before its input 'x1'"):
        reorder_graph_module(cg.gm, ["x2", "x1", "y", "cat"])
    with pytest.raises(MemplanError, match="does not have"):
        reorder_graph_module(cg.gm, ["nope"])


def test_cli_order_best(tmp_path, capsys):
    f = tmp_path / "diamond.py"
    f.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Diamond(nn.Module):
            def __init__(self):
                super().__init__()
                self.y, self.x1, self.x2 = nn.Conv2d(4, 24, 1), nn.Conv2d(4, 32, 1), nn.Conv2d(32, 4, 1)

            def forward(self, x):
                return torch.cat([self.y(x), self.x2(self.x1(x))], 1)
    """))
    assert main(["analyze", f"{f}:Diamond", "--input", "1,4,8,8", "--order", "best", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["order"] == ["x1", "x2", "y", "cat"] == [t["node"] for t in doc["timeline"]]
    assert (doc["program_order_peak_bytes"], doc["peak_bytes"], doc["order_method"]) == (60 * 256, 56 * 256, "dp")
    assert doc["lower_bound_bytes"] == doc["peak_bytes"]
