"""Plots: timeline and arena PNGs stay legible for a 200-op graph; `memplan analyze --plot-arena`."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.figure
import pytest
from matplotlib.collections import PatchCollection
from torch import nn

from memplan.analyze import analyze
from memplan.cli import main
from memplan.planner import plan_arena
from memplan.plot import MAX_TICKS, plot_arena, plot_timeline
from memplan.report import fmt_bytes


@pytest.fixture(scope="module")
def deep_report():
    """200 ops in as-written form: 100 conv + ReLU pairs of growing width."""
    layers = []
    for i in range(100):
        layers += [nn.Conv2d(4 + i % 7, 4 + (i + 1) % 7, 1), nn.ReLU()]
    r = analyze(nn.Sequential(*layers), (1, 4, 16, 16), form="as-written", name="deep200")
    assert len(r.timeline) == 200
    return r


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save."""
    saved = []
    original = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        saved.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return saved


def tick_labels(fig):
    return [t.get_text() for t in fig.axes[0].get_xticklabels()]


def test_timeline_is_legible_for_200_ops(deep_report, figures, tmp_path):
    path = plot_timeline(deep_report, tmp_path / "t.png", top=4)
    assert path.stat().st_size > 10_000
    ax = figures[0].axes[0]
    labels = tick_labels(figures[0])
    assert 10 <= len(labels) <= MAX_TICKS and labels[0] == deep_report.timeline[0].node
    assert "KiB" in ax.get_ylabel()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    at_peak = [lt for lt in deep_report.lifetimes if lt.start <= deep_report.peak_step <= lt.end]
    assert len(legend) == 1 + min(4, len(at_peak)) >= 3 and legend[-1] == "live total"
    assert all(t.endswith(deep_report.graph.storages[lt.storage].producer) and "KiB" in t
               for t, lt in zip(legend, sorted(at_peak, key=lambda lt: -lt.size)))
    assert any(f"peak {fmt_bytes(deep_report.peak_bytes)}" in t.get_text() for t in ax.texts)
    width, height = figures[0].get_size_inches() * 120
    assert width <= 24 * 120 and height <= 6 * 120


def test_arena_plot_draws_every_storage(deep_report, figures, tmp_path):
    plan = plan_arena(deep_report.lifetimes)
    plot_arena(deep_report, plan, tmp_path / "a.png", labels=10)
    ax = figures[0].axes[0]
    (boxes,) = [c for c in ax.collections if isinstance(c, PatchCollection)]
    assert len(boxes.get_paths()) == len(plan.sizes)
    assert len(tick_labels(figures[0])) <= MAX_TICKS and len(ax.texts) <= 10
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "arena" in legend and "lower bound" in legend and "arena/LB 1.000" in legend
    assert (tmp_path / "a.png").stat().st_size > 10_000


def test_cli_plot_arena(tmp_path):
    png = tmp_path / "sub" / "arena.png"
    assert main(["analyze", "zoo:resnet_tiny", "--order", "best", "--plot-arena", str(png),
                 "--plot", str(tmp_path / "t.png"), "--json", str(tmp_path / "r.json")]) == 0
    assert png.stat().st_size > 10_000 and (tmp_path / "t.png").exists()
