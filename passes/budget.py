"""Pick the least aggressive aggressive-pool student whose deployed peak fits a memory budget.

Candidates are tried in order of aggressiveness: factor ``k`` ascending; for each ``k`` the paper's
absorb order (``"stem"``) before ``"latest"``; for each, the block placement ``"input+output"`` (more
blocks, ReDistill's better setting) before ``"output"``. The peak is the deploy-form peak of the
student *with* the blocks distillation will attach (``block``, e.g. ``distill.red.REDBlock``;
docs/definitions.md §5), or bare when ``block`` is None. The first candidate that fits wins; when none
does, :class:`BudgetError` states the best achievable peak.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from memplan.zoo import create_model
    >>> block = lambda c: nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
    >>> fit = fit_budget(create_model("resnet18"), torch.empty(1, 3, 224, 224), 1_000_000, block)
    >>> fit.student.recipe.factor, fit.student.recipe.absorb, fit.placement, fit.peak_bytes
    (4, 'stem', 'input+output', 802816)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from memplan.analyze import analyze
from memplan.report import fmt_bytes
from passes.aggressive_pool import ABSORB, Recipe, Student, build_student, plan_student
from passes.attach import PLACEMENTS, BlockFactory, attach_blocks
from passes.downsampling import AbsorbError, PassError, analyze_downsampling

__all__ = ["BudgetError", "BudgetFit", "Candidate", "fit_budget"]


class BudgetError(PassError):
    """No candidate student fits the budget; the message names the best achievable peak."""


@dataclass(frozen=True)
class Candidate:
    """One student tried by :func:`fit_budget`."""

    factor: int
    absorb: str
    placement: str | None  # block placement; None when blocks are not counted
    peak_bytes: int | None  # deployed peak; None when not measured (see note)
    student_peak_bytes: int | None  # without blocks; None when the factor cannot be absorbed
    note: str = ""  # why the candidate was not measured


@dataclass
class BudgetFit:
    """The chosen student, its peaks, and every candidate tried (in search order)."""

    student: Student
    placement: str | None
    peak_bytes: int  # deployed peak, blocks included when counted
    student_peak_bytes: int
    teacher_peak_bytes: int
    budget_bytes: int
    candidates: tuple[Candidate, ...]


def fit_budget(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    budget_bytes: int,
    block: BlockFactory | None = None,
    *,
    pool: str = "stride",
    factors: Sequence[int] = (2, 4, 8),
) -> BudgetFit:
    """The least aggressive student of ``model`` whose deployed peak is at most ``budget_bytes``."""
    if budget_bytes <= 0:
        raise PassError(f"the memory budget must be positive, got {budget_bytes} bytes")
    analysis = analyze_downsampling(model, example_inputs)
    teacher_peak = analysis.peak_bytes
    tried: list[Candidate] = []
    seen: set[tuple] = set()
    over: list[tuple[int, Recipe]] = []  # (peak without blocks, recipe) of students over budget already
    for factor in factors:
        for absorb in ABSORB:
            try:
                recipe = plan_student(analysis, factor, pool, absorb)
            except AbsorbError as e:
                tried.append(Candidate(factor, absorb, None, None, None, str(e)))
                continue
            if recipe.changes in seen:  # both absorb orders agree (no stem pools)
                continue
            seen.add(recipe.changes)
            student = build_student(model, example_inputs, recipe, analysis)
            if block is not None and student.peak_bytes > budget_bytes:  # blocks only add memory
                tried.append(Candidate(factor, absorb, None, None, student.peak_bytes, "over budget without blocks"))
                over.append((student.peak_bytes, recipe))
                continue
            for placement in PLACEMENTS if block is not None else (None,):
                peak = _peak(student, placement, block, example_inputs)
                tried.append(Candidate(factor, absorb, placement, peak, student.peak_bytes))
                if peak <= budget_bytes:
                    return BudgetFit(student, placement, peak, student.peak_bytes, teacher_peak, budget_bytes,
                                     tuple(tried))
    best = min(((c.peak_bytes, c) for c in tried if c.peak_bytes is not None), default=None, key=lambda t: t[0])
    for bare, recipe in sorted(over, key=lambda t: t[0]):  # lazily: peaks with blocks of students over budget
        if best is not None and best[0] <= bare:
            break
        student = build_student(model, example_inputs, recipe, analysis)
        for placement in PLACEMENTS:
            peak = _peak(student, placement, block, example_inputs)
            if best is None or peak < best[0]:
                best = (peak, Candidate(recipe.factor, recipe.absorb, placement, peak, bare))
    if best is None:
        raise BudgetError(f"no student of {analysis.model} can be built: {tried[0].note}")
    peak, c = best
    red = f", blocks {c.placement}" if c.placement else ""
    raise BudgetError(
        f"no student of {analysis.model} fits {fmt_bytes(budget_bytes)} ({budget_bytes:,} bytes): the best achievable "
        f"deployed peak is {fmt_bytes(peak)} ({peak:,} bytes; k={c.factor}, absorb {c.absorb}{red}); "
        f"the teacher peaks at {fmt_bytes(teacher_peak)}"
    )


def _peak(student: Student, placement: str | None, block: BlockFactory | None,
          example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> int:
    if placement is None or block is None:
        return student.peak_bytes
    return analyze(attach_blocks(student.module, student.stage_map, placement, block), example_inputs).peak_bytes
