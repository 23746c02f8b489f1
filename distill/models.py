"""What a run trains: the student (given, or derived from the teacher by the pooling pass, with RED
blocks), the frozen teacher, and the feature taps the distillation terms compare.

Example:
    >>> from distill.config import TrainConfig
    >>> from distill.data import load_data
    >>> bundle = load_data("digits", image_size=16)
    >>> cfg = TrainConfig(teacher="zoo:resnet_tiny", factor=2)
    >>> cfg.teacher_kwargs = filled_kwargs(cfg.teacher, {}, bundle)
    >>> student, module = derive_student(cfg, bundle, red=True)
    >>> student.recipe.factor, module.red_points[:2]
    (2, ['red_in0', 'red_out0'])
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distill.config import ConfigError, ModelFactory, TrainConfig
from distill.data import DataBundle
from distill.features import FeatureFn, FeatureTap, LogitsOnly
from distill.losses import Objective
from distill.red import REDBlock, attach_red
from memplan.specs import build_model, resolve_factory
from passes import Recipe, Student, aggressive_pool, apply_recipe

__all__ = ["MatchedTap", "derive_student", "feature_fns", "filled_kwargs"]


def filled_kwargs(spec: str | ModelFactory, kwargs: Mapping[str, Any], bundle: DataBundle) -> dict[str, Any]:
    """``kwargs`` plus the factory's ``num_classes``/``in_chans`` parameters, taken from the data."""
    kwargs = dict(kwargs)
    try:
        params = inspect.signature(resolve_factory(spec)).parameters
    except (TypeError, ValueError):
        params = {}
    for key, value in (("num_classes", bundle.num_classes), ("in_chans", bundle.in_chans)):
        if key in params and key not in kwargs:
            kwargs[key] = value
    return kwargs


def derive_student(cfg: TrainConfig, bundle: DataBundle, red: bool) -> tuple[Student, nn.Module]:
    """The aggressive-pool student of ``cfg.teacher`` (fresh weights) and the module to train.

    The module is the student's ``GraphModule``, with RED blocks at ``cfg.placement`` when ``red``.
    """
    arch = build_model(cfg.teacher, cfg.teacher_kwargs)
    x = torch.empty(1, bundle.in_chans, *bundle.input_size, device="meta")
    if cfg.recipe is not None:
        student = apply_recipe(arch, Recipe.load(cfg.recipe), x)
    else:
        student = aggressive_pool(arch, x, factor=cfg.factor, pool=cfg.pool, absorb=cfg.absorb)
    module = attach_red(student.module, student.stage_map, cfg.placement) if red else student.module
    return student, module


class MatchedTap:
    """A ``FeatureTap`` whose names may repeat (several student points matched to one teacher map)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.tap = FeatureTap(list(dict.fromkeys(names)))
        self.index = [self.tap.names.index(name) for name in names]

    def prepare(self, model: nn.Module) -> nn.Module:
        """The tapped module (see ``FeatureTap.prepare``)."""
        return self.tap.prepare(model)

    def __call__(self, model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        logits, feats = self.tap(model, x)
        return logits, [feats[i] for i in self.index]


def feature_fns(
    cfg: TrainConfig, objective: Objective, student: nn.Module, derived: Student | None
) -> tuple[FeatureFn, FeatureFn]:
    """Student and teacher feature functions: explicit taps, else the derived student's stage map."""
    if not objective.needs_features:
        return LogitsOnly(), LogitsOnly()
    if derived is None:
        reds = [name for name, m in student.named_modules() if isinstance(m, REDBlock)]
        default_student, default_teacher = reds if objective.needs_red_blocks else [], []
    elif objective.needs_red_blocks:
        default_student, default_teacher = list(student.red_points), list(student.red_teachers)
    else:
        pairs = derived.stage_map.outputs
        default_student, default_teacher = [p.student for p in pairs], [p.teacher for p in pairs]
    student_taps = list(cfg.student_taps) or default_student
    teacher_taps = list(cfg.teacher_taps) or default_teacher
    if not student_taps or not teacher_taps:
        raise ConfigError(
            f"method {cfg.method!r} needs student_taps (or RED blocks) and teacher_taps, or a student derived "
            "with factor/recipe whose stage map matches teacher maps"
        )
    return MatchedTap(tuple(student_taps)), MatchedTap(tuple(teacher_taps))
