"""Registry of distillation methods (mdistiller names) and the combined training objective.

A method is an ``nn.Module`` registered under a name with ``@register``. It declares what it needs
(``needs_teacher``, ``needs_features``, ``needs_red_blocks``), may build shape-dependent trainable
parameters in ``setup`` (FitNet regressors), and maps a ``LossInputs`` to a dict of named,
method-weighted terms. ``build_objective("red+kd")`` combines methods into an ``Objective``:

    total = task_weight * CE(student_logits, labels) + distill_weight * sum(method terms)

Defaults (docs/definitions.md §5; mdistiller's per-method coefficients):

- ``task_weight``: 1.0 when no method adds a term (``none``, ``red-blocks``), else 0.5;
  ``distill_weight``: 0.5 (the paper's 0.5 * task + 0.5 * distill).
- ``kd``: ``temperature=4``, term ``T^2 * KL(p_t || p_s)`` (mdistiller uses CE 0.1 / KD 0.9:
  ``task_weight=0.1 distill_weight=0.9``).
- ``fitnet``: ``weight=100``, term ``weight * mean_i MSE(regressor_i(s_i), t_i)``; the regressor is
  mdistiller's ConvReg at equal size: 1x1 conv + BN + ReLU.
- ``at``: ``p=2, beta=1000`` (mdistiller's FEAT_WEIGHT), term
  ``beta * sum_i mean((a(s_i) - a(t_i))^2)`` with ``a(f) = normalize(mean_c(f^p))``.
- ``red``: ``alpha=1`` (50 on STL10 in the paper), term ``alpha * mean_i red_loss(s_i, t_i)``.

``LossOutput.terms`` holds each weighted contribution (``task`` included), so they sum to ``total``.

>>> import torch
>>> obj = build_objective("kd")
>>> logits = torch.tensor([[2.0, 0.0]])
>>> out = obj(LossInputs(logits, torch.tensor([0]), teacher_logits=logits))
>>> sorted(out.terms), round(float(out.terms["kd"]), 6)
(['kd', 'task'], 0.0)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.red import red_loss
from memplan.errors import MemplanError
from memplan.registry import Registry, UnknownNameError

__all__ = [
    "METHODS",
    "DistillMethod",
    "LossInputs",
    "LossOutput",
    "Objective",
    "build_objective",
    "register",
]


@dataclass
class LossInputs:
    """Everything a method may read for one batch (features in matched order)."""

    student_logits: Tensor
    labels: Tensor
    teacher_logits: Tensor | None = None
    student_feats: Sequence[Tensor] = ()
    teacher_feats: Sequence[Tensor] = ()


@dataclass
class LossOutput:
    """Total loss and its weighted terms (``task`` plus one per method that adds one)."""

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


class DistillMethod(nn.Module):
    """Base class of a registered method; subclasses override ``forward`` (and maybe ``setup``)."""

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    needs_features: ClassVar[bool] = False
    needs_red_blocks: ClassVar[bool] = False
    adds_loss: ClassVar[bool] = True

    def setup(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> None:
        """Build shape-dependent parameters from one batch of matched features (default: none)."""

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        """Named, method-weighted loss terms of one batch."""
        return {}


class MethodError(MemplanError, ValueError):
    """A bad method spec or option, or inputs a method cannot use."""


class _UnknownMethod(MethodError, UnknownNameError):
    """A method spec naming no registered method."""


METHODS: Registry[type[DistillMethod]] = Registry("distillation method", unknown_error=_UnknownMethod)
_M = TypeVar("_M", bound=type[DistillMethod])


def register(name: str) -> Callable[[_M], _M]:
    """Class decorator adding a method to ``METHODS`` under ``name``.

    >>> @register("zero-demo")
    ... class Zero(DistillMethod):
    ...     needs_teacher = False
    >>> "zero-demo" in METHODS
    True
    >>> del METHODS["zero-demo"]
    """

    def add(cls: _M) -> _M:
        if "+" in name:
            raise MethodError(f"method names cannot contain '+': {name!r}")
        METHODS.add(name, cls)
        cls.name = name
        return cls

    return add


@register("none")
class NoDistill(DistillMethod):
    """Task loss only (teacher training, vanilla student)."""

    needs_teacher = False
    adds_loss = False


@register("red-blocks")
class REDBlocksOnly(DistillMethod):
    """RED blocks attached to the student, trained with the task loss only."""

    needs_teacher = False
    needs_red_blocks = True
    adds_loss = False


@register("kd")
class KD(DistillMethod):
    """Hinton KD: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, summed over classes, batch mean."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise MethodError(f"kd temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        t = self.temperature
        log_p_s = F.log_softmax(inputs.student_logits / t, dim=1)
        if inputs.teacher_logits is None:
            raise MethodError("kd needs teacher logits")
        p_t = F.softmax(inputs.teacher_logits.to(log_p_s.dtype) / t, dim=1)
        return {"kd": t * t * F.kl_div(log_p_s, p_t, reduction="none").sum(1).mean()}


@register("fitnet")
class FitNet(DistillMethod):
    """FitNet hints: MSE between a regressed student feature and the teacher feature."""

    needs_features = True

    def __init__(self, weight: float = 100.0) -> None:
        super().__init__()
        self.weight = weight
        self.regressors = nn.ModuleList()

    def setup(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> None:
        """Build one 1x1 conv + BN + ReLU regressor per matched pair (mdistiller's ConvReg)."""
        self.regressors = nn.ModuleList()
        for s, t in zip(student_feats, teacher_feats):
            _check_same_spatial("fitnet", s, t)
            regressor = nn.Sequential(
                nn.Conv2d(s.shape[1], t.shape[1], kernel_size=1), nn.BatchNorm2d(t.shape[1]), nn.ReLU()
            )
            self.regressors.append(regressor.to(s.device))

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        if len(self.regressors) != len(inputs.student_feats):
            raise RuntimeError("fitnet: call Objective.setup(student_feats, teacher_feats) before training")
        losses = [
            F.mse_loss(reg(s), t.to(s.dtype))
            for reg, s, t in zip(self.regressors, inputs.student_feats, inputs.teacher_feats)
        ]
        return {"fitnet": self.weight * torch.stack(losses).mean()}


@register("at")
class AT(DistillMethod):
    """Attention transfer (Zagoruyko & Komodakis), mdistiller form."""

    needs_features = True

    def __init__(self, p: float = 2.0, beta: float = 1000.0) -> None:
        super().__init__()
        self.p = p
        self.beta = beta

    def attention(self, feat: Tensor) -> Tensor:
        """``normalize(mean_c(feat ** p))`` flattened per sample: ``(N, H*W)`` unit vectors."""
        return F.normalize(feat.pow(self.p).mean(1).flatten(1), dim=1)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        losses = []
        for s, t in zip(inputs.student_feats, inputs.teacher_feats):
            _check_same_spatial("at", s, t)
            losses.append((self.attention(s) - self.attention(t.to(s.dtype))).pow(2).mean())
        return {"at": self.beta * torch.stack(losses).sum()}


@register("red")
class RED(DistillMethod):
    """ReDistill: ``alpha * mean`` of the RED loss over the RED-block outputs (docs/definitions.md §5)."""

    needs_features = True
    needs_red_blocks = True

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        losses = [red_loss(s, t) for s, t in zip(inputs.student_feats, inputs.teacher_feats)]
        return {"red": self.alpha * torch.stack(losses).mean()}


class Objective(nn.Module):
    """Task loss plus the terms of one or more methods; owns the methods' trainable parameters."""

    def __init__(
        self,
        methods: Sequence[DistillMethod],
        *,
        task_weight: float | None = None,
        distill_weight: float = 0.5,
    ) -> None:
        super().__init__()
        if not methods:
            raise MethodError("an objective needs at least one method")
        self.methods = nn.ModuleList(methods)
        adds_loss = any(m.adds_loss for m in methods)
        self.task_weight = (0.5 if adds_loss else 1.0) if task_weight is None else task_weight
        self.distill_weight = distill_weight

    @property
    def spec(self) -> str:
        return "+".join(m.name for m in self.methods)

    @property
    def needs_teacher(self) -> bool:
        return any(m.needs_teacher for m in self.methods)

    @property
    def needs_features(self) -> bool:
        return any(m.needs_features for m in self.methods)

    @property
    def needs_red_blocks(self) -> bool:
        return any(m.needs_red_blocks for m in self.methods)

    def setup(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> None:
        """Check the matched features of one batch and build shape-dependent parameters."""
        if self.needs_features:
            if not student_feats or len(student_feats) != len(teacher_feats):
                raise MethodError(
                    f"method {self.spec!r} needs matched features: got {len(student_feats)} student and "
                    f"{len(teacher_feats)} teacher features"
                )
            for i, (s, t) in enumerate(zip(student_feats, teacher_feats)):
                if s.dim() != 4 or t.dim() != 4:
                    raise MethodError(
                        f"feature pair {i}: expected (N, C, H, W) maps, got {tuple(s.shape)} and {tuple(t.shape)}"
                    )
        for method in self.methods:
            method.setup(student_feats, teacher_feats)

    def forward(self, inputs: LossInputs) -> LossOutput:
        terms = {"task": self.task_weight * F.cross_entropy(inputs.student_logits, inputs.labels)}
        for method in self.methods:
            for name, value in method(inputs).items():
                terms[name] = self.distill_weight * value
        return LossOutput(total=torch.stack(list(terms.values())).sum(), terms=terms)


def build_objective(
    spec: str,
    *,
    task_weight: float | None = None,
    distill_weight: float = 0.5,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Objective:
    """Build an ``Objective`` from a method spec such as ``"red"`` or ``"red+kd"``.

    ``options`` maps method names to constructor keywords (``{"kd": {"temperature": 2}}``);
    entries for registered methods not in ``spec`` are ignored, unknown names are errors.

    >>> obj = build_objective("red+kd", options={"red": {"alpha": 50}})
    >>> obj.spec, obj.task_weight, obj.methods[0].alpha
    ('red+kd', 0.5, 50)
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(METHODS))
    if unknown:
        raise MethodError(f"options for unknown methods {unknown}; registered: {', '.join(METHODS.names())}")
    names = [part.strip() for part in spec.split("+")]
    for name in names:
        if name not in METHODS:
            raise MethodError(
                f"unknown distillation method {name!r} in {spec!r}; registered: {', '.join(METHODS.names())}"
            )
    if len(set(names)) != len(names):
        raise MethodError(f"method spec {spec!r} repeats a method")
    if len(names) > 1 and "none" in names:
        raise MethodError(f"'none' cannot be combined with other methods: {spec!r}")
    methods = []
    for name in names:
        kwargs = dict(options.get(name, {}))
        try:
            methods.append(METHODS[name](**kwargs))
        except TypeError as exc:
            raise MethodError(f"bad options {kwargs} for method {name!r}: {exc}") from exc
    return Objective(methods, task_weight=task_weight, distill_weight=distill_weight)


def _check_same_spatial(method: str, s: Tensor, t: Tensor) -> None:
    if s.shape[2:] != t.shape[2:]:
        raise MethodError(
            f"{method}: student feature {tuple(s.shape)} and teacher feature {tuple(t.shape)} differ in "
            "spatial size; tap matched points of equal resolution"
        )
