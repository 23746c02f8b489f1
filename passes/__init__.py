"""Graph rewrites on traced CNNs: aggressive-pooling students (docs/definitions.md §4), block (RED) attachment (§5), budgets.

Example:
    >>> import torch
    >>> from memplan.zoo import create_model
    >>> import passes
    >>> s = passes.aggressive_pool(create_model("resnet18"), torch.empty(1, 3, 224, 224), factor=4)
    >>> s.peak_bytes, [lv.student for lv in s.strides]
    (802816, [8, 1, 2, 2, 1])
"""

from passes.aggressive_pool import (
    ABSORB,
    ENCDEC_PLACEMENTS,
    POOLS,
    TAILS,
    InsertPool,
    InsertTail,
    LevelStride,
    Recipe,
    Rescale,
    Restride,
    Site,
    StageMap,
    StagePair,
    Student,
    WeightTransfer,
    aggressive_pool,
    apply_recipe,
    build_student,
    plan_student,
    transfer_weights,
)
from passes.attach import PLACEMENTS, BlockFactory, attach_blocks
from passes.budget import BudgetError, BudgetFit, Candidate, fit_budget
from passes.downsampling import (
    AbsorbError,
    DownsamplingAnalysis,
    Geometry,
    Level,
    PassError,
    Point,
    Stem,
    UpPoint,
    UpsamplingError,
    analyze_downsampling,
)
from passes.layout import Layout, propagate_layout, spatial_size

__all__ = [
    "ABSORB", "ENCDEC_PLACEMENTS", "PLACEMENTS", "POOLS", "TAILS", "AbsorbError", "BlockFactory", "BudgetError",
    "BudgetFit", "Candidate", "DownsamplingAnalysis", "Geometry", "InsertPool", "InsertTail", "Layout", "Level",
    "LevelStride", "PassError", "Point", "Recipe", "Rescale", "Restride", "Site", "StageMap", "StagePair", "Stem",
    "Student", "UpPoint", "UpsamplingError", "WeightTransfer", "aggressive_pool", "analyze_downsampling", "apply_recipe",
    "attach_blocks", "build_student", "fit_budget", "plan_student", "propagate_layout", "spatial_size",
    "transfer_weights",
]
