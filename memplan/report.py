"""Human-readable reports: byte formatting, the analyze table, per-stage peaks."""

from __future__ import annotations

import re

from memplan.analyze import MemoryReport
from memplan.errors import MemplanError


def fmt_bytes(n: float) -> str:
    """Format bytes with binary units (KiB = 2^10, MiB = 2^20).

    Example:
        >>> fmt_bytes(4014080), fmt_bytes(802816), fmt_bytes(512)
        ('3.828 MiB', '784.00 KiB', '512 B')
    """
    if abs(n) >= 2**20:
        return f"{n / 2**20:.3f} MiB"
    if abs(n) >= 2**10:
        return f"{n / 2**10:.2f} KiB"
    return f"{int(n)} B"


def stage_of(module: str) -> str:
    """The top-level stage a module path belongs to (``layer2.0.conv1`` → ``layer2``)."""
    return module.split(".")[0] if module else "(top)"


def stage_peaks(report: MemoryReport) -> list[tuple[str, int, int]]:
    """(stage, peak live bytes, ops) for each top-level stage, in execution order."""
    stages: dict[str, list[int]] = {}
    for t in report.timeline:
        s = stages.setdefault(stage_of(t.module), [0, 0])
        s[0] = max(s[0], t.live_bytes)
        s[1] += 1
    return [(name, peak, n) for name, (peak, n) in stages.items()]


def format_table(report: MemoryReport, top: int = 10) -> str:
    """The table ``memplan analyze`` prints."""
    lines = [
        f"model            {report.model}  (captured by {report.method})",
        f"input            {'x'.join(map(str, report.input_shape))}  {report.dtype}  form={report.form}",
        f"peak activation  {fmt_bytes(report.peak_bytes)}  ({report.peak_bytes:,} bytes) at step "
        f"{report.peak_step} '{report.peak_node}'",
        f"input            {fmt_bytes(report.input_bytes)}",
        f"parameters       {fmt_bytes(report.param_bytes)}"
        + (f"  (+ {fmt_bytes(report.param_side_bytes)} computed from them, folded)" if report.param_side_bytes else ""),
        f"sum of outputs   {fmt_bytes(report.activation_sum_bytes)}  (what per-layer summaries add up)",
    ]
    for key, label in (("arena_bytes", "arena plan"), ("program_order_peak_bytes", "program order")):
        if key in report.extra:
            lines.append(f"{label:<17}{fmt_bytes(report.extra[key])}")
    lines += ["", f"live at the peak (top {top}):", f"  {'tensor':<32} {'shape':<20} {'size':>12}  module"]
    for t in report.live_at_peak[:top]:
        shape = "x".join(map(str, t.shape))
        lines.append(f"  {t.tensor:<32} {shape:<20} {fmt_bytes(t.bytes):>12}  {t.producer_module or '-'}")
    if len(report.live_at_peak) > top:
        rest = sum(t.bytes for t in report.live_at_peak[top:])
        lines.append(f"  ... {len(report.live_at_peak) - top} more, {fmt_bytes(rest)}")
    lines += ["", "peak per stage:", f"  {'stage':<20} {'ops':>5} {'peak':>12}"]
    for name, peak, n in stage_peaks(report):
        mark = "  <- peak" if peak == report.peak_bytes else ""
        lines.append(f"  {name:<20} {n:>5} {fmt_bytes(peak):>12}{mark}")
    return "\n".join(lines)


_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gib": 2**30, "gb": 10**9}


def parse_bytes(text: str) -> int:
    """Parse a memory size: ``512KiB``, ``1.5MiB``, ``800000``, ``2MB`` (K/M/G alone are binary).

    >>> parse_bytes("512KiB"), parse_bytes("1.5MiB"), parse_bytes("800,000"), parse_bytes("2 MB")
    (524288, 1572864, 800000, 2000000)
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text.replace(",", "").replace("_", ""))
    if not match or match.group(2).lower() not in _UNITS:
        raise MemplanError(f"bad memory size '{text}': use bytes or a unit, e.g. 800000, 512KiB, 1.5MiB, 2MB")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value < 1:
        raise MemplanError(f"bad memory size '{text}': must be at least 1 byte")
    return value
