"""Plots: the live-memory timeline with the peak marked and the largest contributors stacked."""

from __future__ import annotations

from pathlib import Path

from memplan.analyze import MemoryReport


def _unit(max_bytes: float) -> tuple[float, str]:
    return (2**20, "MiB") if max_bytes >= 2**20 else (2**10, "KiB")


def plot_timeline(report: MemoryReport, path: str | Path, top: int = 5) -> Path:
    """Draw live bytes per step as a PNG; the ``top`` largest storages live at the peak are stacked.

    Example:
        >>> from memplan.zoo import create_model
        >>> from memplan.analyze import analyze
        >>> plot_timeline(analyze(create_model("resnet18")), "/tmp/resnet18.png").name
        'resnet18.png'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [t.step for t in report.timeline]
    live = [t.live_bytes for t in report.timeline]
    scale, unit = _unit(max(live))
    fig, ax = plt.subplots(figsize=(max(8.0, min(24.0, len(steps) / 12)), 4.5))
    contributors = sorted(
        (lt for lt in report.lifetimes if lt.start <= report.peak_step <= lt.end), key=lambda lt: -lt.size
    )[:top]
    bottom = [0.0] * len(steps)
    g = report.graph
    for lt in contributors:
        ys = [lt.size / scale if lt.start <= s <= lt.end else 0.0 for s in steps]
        label = (g.storages[lt.storage].producer if g else None) or "input"
        ax.fill_between(steps, bottom, [b + y for b, y in zip(bottom, ys)], step="mid", alpha=0.5,
                        label=f"{label} ({lt.size / scale:.2f} {unit})")
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.step(steps, [v / scale for v in live], where="mid", color="black", lw=1.2, label="live total")
    ax.axvline(report.peak_step, color="red", ls="--", lw=1)
    ax.annotate(f"peak {report.peak_bytes / scale:.3f} {unit}\n{report.peak_node}",
                (report.peak_step, report.peak_bytes / scale), xytext=(8, -4), textcoords="offset points",
                color="red", fontsize=8, va="top")
    stride = max(1, len(steps) // 40)
    ax.set_xticks(steps[::stride])
    ax.set_xticklabels([report.timeline[s].node for s in steps[::stride]], rotation=90, fontsize=6)
    ax.set_ylabel(f"live activation memory ({unit})")
    ax.set_title(f"{report.model} {'x'.join(map(str, report.input_shape))} {report.dtype}, {report.form} form")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_ylim(0, max(live) / scale * 1.15)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
