"""Plots (PNG via matplotlib): the live-memory timeline with the peak marked and the largest
contributors stacked, and the arena plan as offset-versus-step rectangles.

Both stay legible for graphs of hundreds of ops: at most ``MAX_TICKS`` op names label the x axis,
sizes are in KiB or MiB, and only rectangles big enough to hold text are labelled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memplan.analyze import MemoryReport
from memplan.io import atomic_write
from memplan.planner import ArenaPlan
from memplan.report import fmt_bytes

MAX_TICKS = 40


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _unit(max_bytes: float) -> tuple[float, str]:
    return (2**20, "MiB") if max_bytes >= 2**20 else (2**10, "KiB")


def _name(report: MemoryReport, storage: int) -> str:
    g = report.graph
    return (g.storages[storage].producer if g else None) or "input"


def _figure(report: MemoryReport, height: float) -> tuple[Any, Any]:
    """A figure whose width grows with the number of steps, x ticks thinned to op names."""
    plt = _pyplot()
    steps = len(report.timeline)
    fig, ax = plt.subplots(figsize=(max(8.0, min(24.0, steps / 12)), height))
    ticks = list(range(0, steps, max(1, -(-steps // MAX_TICKS))))
    ax.set_xticks(ticks)
    ax.set_xticklabels([report.timeline[s].node for s in ticks], rotation=90, fontsize=6)
    ax.set_xlim(-0.5, steps - 0.5)
    ax.set_xlabel("step (op)")
    return fig, ax


def _title(report: MemoryReport) -> str:
    return f"{report.model} {'x'.join(map(str, report.input_shape))} {report.dtype}, {report.form} form"


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        _pyplot().close(fig)
    return path


def plot_timeline(report: MemoryReport, path: str | Path, top: int = 5) -> Path:
    """Draw live bytes per step as a PNG; the ``top`` largest storages live at the peak are stacked.

    Example:
        >>> from memplan.zoo import create_model
        >>> from memplan.analyze import analyze
        >>> plot_timeline(analyze(create_model("resnet18")), "/tmp/resnet18.png").name
        'resnet18.png'
    """
    steps = [t.step for t in report.timeline]
    live = [t.live_bytes for t in report.timeline]
    scale, unit = _unit(max(live))
    fig, ax = _figure(report, 4.5)
    contributors = sorted(
        (lt for lt in report.lifetimes if lt.start <= report.peak_step <= lt.end), key=lambda lt: -lt.size
    )[:top]
    bottom = [0.0] * len(steps)
    for lt in contributors:
        top_edge = [b + (lt.size / scale if lt.start <= s <= lt.end else 0.0) for b, s in zip(bottom, steps)]
        ax.fill_between(steps, bottom, top_edge, step="mid", alpha=0.5,
                        label=f"{fmt_bytes(lt.size)}: {_name(report, lt.storage)}")  # no leading "_"
        bottom = top_edge
    ax.step(steps, [v / scale for v in live], where="mid", color="black", lw=1.2, label="live total")
    ax.axvline(report.peak_step, color="red", ls="--", lw=1)
    ax.annotate(f"peak {fmt_bytes(report.peak_bytes)}\n{report.peak_node}",
                (report.peak_step, report.peak_bytes / scale), xytext=(8, 4), textcoords="offset points",
                color="red", fontsize=8, va="bottom", bbox={"fc": "white", "ec": "none", "alpha": 0.8})
    ax.set_ylabel(f"live activation memory ({unit})")
    ax.set_title(_title(report))
    ax.legend(fontsize=7, loc="upper right")
    ax.set_ylim(0, max(live) / scale * 1.2)
    return _save(fig, path)


def plot_arena(report: MemoryReport, plan: ArenaPlan, path: str | Path, labels: int = 15) -> Path:
    """Draw the arena plan as a PNG: one rectangle per storage (x: live steps, y: offset range),
    the arena size and lower bound as lines; the ``labels`` largest rectangles the text fits in are
    named.

    Example:
        >>> from memplan.zoo import create_model
        >>> from memplan.analyze import analyze
        >>> from memplan.planner import plan_arena
        >>> r = analyze(create_model("resnet18"))
        >>> plot_arena(r, plan_arena(r.lifetimes), "/tmp/resnet18_arena.png").name
        'resnet18_arena.png'
    """
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    scale, unit = _unit(plan.arena_bytes)
    fig, ax = _figure(report, 5.5)
    used = [lt for lt in report.lifetimes if plan.sizes.get(lt.storage)]
    boxes = [
        Rectangle((lt.start - 0.5, plan.offsets[lt.storage] / scale), lt.end - lt.start + 1,
                  plan.sizes[lt.storage] / scale)
        for lt in used
    ]
    colors = plt.get_cmap("tab20")
    ax.add_collection(PatchCollection(boxes, facecolors=[colors(i % 20) for i in range(len(boxes))],
                                      edgecolors="black", linewidths=0.3, alpha=0.85))
    top = plan.arena_bytes / scale
    ax.set_ylim(0, top * 1.12 if top else 1)
    # inches per step and per y unit, roughly (the axes fill ~85% x 65% of the figure)
    fig_w, fig_h = fig.get_size_inches()
    per_x, per_y = 0.85 * fig_w / max(1, len(report.timeline)), 0.65 * fig_h / ax.get_ylim()[1]
    ranked = sorted(zip(used, boxes), key=lambda lb: -lb[1].get_width() * lb[1].get_height())
    placed = 0
    for lt, box in ranked:
        text = f"{_name(report, lt.storage)}\n{fmt_bytes(plan.sizes[lt.storage])}"
        text_w, text_h = max(map(len, text.split("\n"))) * 6 * 0.6 / 72, 2 * 6 * 1.3 / 72  # 6-pt font
        box_w, box_h = box.get_width() * per_x, box.get_height() * per_y
        rotation = 0 if box_w >= text_w and box_h >= text_h else 90 if box_h >= text_w and box_w >= text_h else None
        if rotation is None:
            continue  # the text would spill over its rectangle
        ax.text(box.get_x() + box.get_width() / 2, box.get_y() + box.get_height() / 2, text, ha="center",
                va="center", fontsize=6, rotation=rotation, clip_on=True)
        placed += 1
        if placed == labels:
            break
    ax.axhline(top, color="red", ls="--", lw=1, label=f"arena {fmt_bytes(plan.arena_bytes)} ({plan.strategy})")
    ax.axhline(plan.lower_bound_bytes / scale, color="black", ls=":", lw=1,
               label=f"lower bound {fmt_bytes(plan.lower_bound_bytes)} (arena/LB {plan.ratio:.3f})")
    ax.set_ylabel(f"offset in arena ({unit}, alignment {plan.alignment} B)")
    ax.set_title(f"arena plan: {_title(report)}")
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)
