"""Planner quality: program-order vs best-order peak, arena size vs lower bound, planning time.

Models: the memplan zoo, plus branchy nets where the op order matters: a stack of Inception-style
blocks, a DenseNet block, and randomly wired nets built from Watts-Strogatz graphs (RandWire, as
in the Serenity paper). Every plan is validated with ``check_plan``. Prints a table and writes
``benchmarks/results/planner_quality.json``.

Usage:
    python benchmarks/planner_quality.py [--only NAME ...] [--time-limit SECONDS]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import networkx as nx
import torch
from torch import nn

from memplan.analyze import analyze, report_from_graph
from memplan.planner import check_plan, plan_arena
from memplan.report import fmt_bytes
from memplan.schedule import best_order
from memplan.zoo import create_model, default_input, list_models

RESULTS = Path(__file__).parent / "results" / "planner_quality.json"


def conv_bn_relu(cin: int, cout: int, k: int = 1, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Inception(nn.Module):
    """GoogLeNet-style block: 1x1 | 1x1-3x3 | 1x1-3x3-3x3 | pool-1x1, concatenated."""

    def __init__(self, cin: int, c1: int, c3: tuple[int, int], c5: tuple[int, int], cp: int) -> None:
        super().__init__()
        self.b1 = conv_bn_relu(cin, c1)
        self.b3 = nn.Sequential(conv_bn_relu(cin, c3[0]), conv_bn_relu(c3[0], c3[1], 3))
        self.b5 = nn.Sequential(conv_bn_relu(cin, c5[0]), conv_bn_relu(c5[0], c5[1], 3),
                                conv_bn_relu(c5[1], c5[1], 3))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn_relu(cin, cp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


def inception_stack() -> nn.Module:
    """Stem plus four Inception blocks (GoogLeNet 3a, 3b, 4a-like widths, scaled to 64 px)."""
    return nn.Sequential(
        conv_bn_relu(3, 64, 3, 2),
        Inception(64, 32, (48, 64), (8, 16), 16),
        Inception(128, 64, (64, 96), (16, 48), 32),
        nn.MaxPool2d(2),
        Inception(240, 96, (48, 104), (8, 24), 32),
        Inception(256, 80, (56, 112), (12, 32), 32),
    )


class DenseBlock(nn.Module):
    """A DenseNet-BC block: each layer (BN-ReLU-1x1-BN-ReLU-3x3) sees the concat of all before it."""

    def __init__(self, cin: int = 64, growth: int = 32, layers: int = 6) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(cin + i * growth), nn.ReLU(), nn.Conv2d(cin + i * growth, 4 * growth, 1),
                          nn.BatchNorm2d(4 * growth), nn.ReLU(), nn.Conv2d(4 * growth, growth, 3, padding=1))
            for i in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class RandWire(nn.Module):
    """A randomly wired stage (Xie et al. 2019): a Watts-Strogatz graph oriented by node index;
    each node sums its inputs and applies ReLU-conv3x3-BN; the sinks are averaged."""

    def __init__(self, nodes: int = 16, k: int = 4, p: float = 0.75, seed: int = 0, channels: int = 32) -> None:
        super().__init__()
        g = nx.connected_watts_strogatz_graph(nodes, k, p, seed=seed)
        self.preds = [sorted(u for u in g.neighbors(v) if u < v) for v in range(nodes)]
        self.sinks = [v for v in range(nodes) if all(w < v for w in g.neighbors(v))]
        self.stem = conv_bn_relu(3, channels, 3, 2)
        self.nodes = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
            for _ in range(nodes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        outs: list[torch.Tensor] = []
        for node, preds in zip(self.nodes, self.preds):
            h = x
            if preds:
                h = outs[preds[0]]
                for u in preds[1:]:
                    h = h + outs[u]
            outs.append(node(h))
        y = outs[self.sinks[0]]
        for v in self.sinks[1:]:
            y = y + outs[v]
        return y / len(self.sinks)


BRANCHY: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "inception_stack": (inception_stack, (1, 3, 64, 64)),
    "dense_block": (DenseBlock, (1, 64, 32, 32)),
    **{f"randwire_ws{n}_s{s}": ((lambda n=n, s=s: RandWire(n, seed=s)), (1, 3, 64, 64))
       for n in (8, 12, 16, 32) for s in range(3)},
    "randwire_ws64_s0": (lambda: RandWire(64, seed=0), (1, 3, 64, 64)),
}


def group_of(name: str) -> str:
    return "zoo" if name in list_models() else "randwire" if name.startswith("randwire") else "branchy"


def evaluate(name: str, time_limit: float, align: int) -> dict:
    model, shape = (create_model(name), default_input(name)) if name in list_models() else (
        BRANCHY[name][0](), BRANCHY[name][1])
    torch.manual_seed(0)
    report = analyze(model, shape, name=name)
    sched = best_order(report.graph, time_limit=time_limit)
    best = report_from_graph(report.graph, order=sched.order)
    assert best.peak_bytes == sched.peak_bytes
    plans = {}
    for key, r in (("program", report), ("best", best)):
        plan = plan_arena(r.lifetimes, alignment=align)
        check_plan(plan, r.lifetimes)
        greedy = plan_arena(r.lifetimes, alignment=align, strategies=["greedy_by_size"])
        check_plan(greedy, r.lifetimes)
        plans[key] = (plan, greedy)
    plan, greedy = plans["best"]
    return {
        "model": name, "group": group_of(name), "ops": len(report.graph.ops),
        "program_lb_bytes": report.peak_bytes, "best_lb_bytes": sched.peak_bytes,
        "saving": sched.saving, "order_method": sched.method, "order_source": sched.source,
        "order_states": sched.states, "order_seconds": sched.seconds,
        "arena_bytes": plan.arena_bytes, "lower_bound_bytes": plan.lower_bound_bytes,
        "arena_ratio": plan.ratio, "arena_strategy": plan.strategy, "plan_seconds": plan.seconds,
        "program_arena_bytes": plans["program"][0].arena_bytes,
        "program_arena_ratio": plans["program"][0].ratio,
        "greedy_by_size_ratio": greedy.ratio, "program_greedy_by_size_ratio": plans["program"][1].ratio,
    }


def table(rows: list[dict]) -> str:
    head = (f"{'model':<22} {'ops':>4} {'program LB':>12} {'best LB':>12} {'saved':>6} {'order':>9} "
            f"{'order s':>7} {'arena':>12} {'arena/LB':>8} {'prog a/LB':>9} {'TFLite a/LB':>11} "
            f"{'strategy':<19} {'plan ms':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<22} {r['ops']:>4} {fmt_bytes(r['program_lb_bytes']):>12} "
            f"{fmt_bytes(r['best_lb_bytes']):>12} {r['saving']:>6.1%} {r['order_method']:>9} "
            f"{r['order_seconds']:>7.2f} {fmt_bytes(r['arena_bytes']):>12} {r['arena_ratio']:>8.4f} "
            f"{r['program_arena_ratio']:>9.4f} {r['greedy_by_size_ratio']:>11.4f} {r['arena_strategy']:<19} "
            f"{r['plan_seconds'] * 1e3:>7.1f}"
        )
    return "\n".join(lines)


def targets(rows: list[dict]) -> tuple[list[str], dict]:
    zoo = [r for r in rows if r["group"] == "zoo"]
    rand = [r for r in rows if r["group"] == "randwire"]
    small_dp = [r for r in rows if r["ops"] <= 60]
    ratios = [r[k] for r in zoo for k in ("arena_ratio", "program_arena_ratio")]
    summary = {
        "zoo_arena_ratio_median": statistics.median(ratios) if ratios else None,
        "zoo_arena_ratio_max": max(ratios, default=None),
        "randwire_saving_min": min((r["saving"] for r in rand), default=None),
        "randwire_saving_median": statistics.median([r["saving"] for r in rand]) if rand else None,
        "randwire_saving_mean": statistics.mean([r["saving"] for r in rand]) if rand else None,
        "randwire_at_least_10pct": sum(r["saving"] >= 0.10 for r in rand),
        "randwire_below_10pct_proven_optimal": all(r["order_method"] == "dp" for r in rand if r["saving"] < 0.10),
        "dp_max_seconds_up_to_60_ops": max((r["order_seconds"] for r in small_dp), default=None),
        "dp_all_proven_up_to_60_ops": all(r["order_method"] == "dp" for r in small_dp),
    }
    lines = []
    if ratios:
        lines.append(f"zoo arena/LB (program and best orders): median {summary['zoo_arena_ratio_median']:.4f} "
                     f"(target <= 1.01), max {summary['zoo_arena_ratio_max']:.4f} (target <= 1.05)")
    if rand:
        lines.append(f"randwire peak saved vs program order: min {summary['randwire_saving_min']:.1%}, "
                     f"median {summary['randwire_saving_median']:.1%}, mean {summary['randwire_saving_mean']:.1%} "
                     f"(target >= 10%); {summary['randwire_at_least_10pct']}/{len(rand)} nets >= 10%, the others "
                     f"{'proven optimal' if summary['randwire_below_10pct_proven_optimal'] else 'not all proven'}")
    if small_dp:
        lines.append(f"graphs <= 60 ops: exact DP proved optimal on all: {summary['dp_all_proven_up_to_60_ops']}, "
                     f"slowest {summary['dp_max_seconds_up_to_60_ops']:.2f} s (target <= 10 s)")
    return lines, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="model names (default: zoo + branchy nets)")
    ap.add_argument("--time-limit", type=float, default=30.0,
                    help="order search budget per model (s); generous so that the exact search's state budget, "
                         "not the machine's load, decides between DP and heuristic")
    ap.add_argument("--align", type=int, default=64)
    args = ap.parse_args()
    names = args.only or [*list_models(), *BRANCHY]
    rows = []
    t0 = time.perf_counter()
    for name in names:
        rows.append(evaluate(name, args.time_limit, args.align))
        print(f"  {name}: done", flush=True)
    lines, summary = targets(rows)
    print()
    print(table(rows))
    print()
    print("\n".join(lines))
    print(f"(all plans checked; alignment {args.align} B; total {time.perf_counter() - t0:.1f} s)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"alignment": args.align, "time_limit": args.time_limit, "rows": rows,
                                   "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
