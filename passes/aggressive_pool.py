"""Aggressive-pooling students (docs/definitions.md §4), derived from the traced graph of any CNN.

A factor-``k`` student moves ``k`` of downsampling into the stem and takes it out again further on,
so every early feature map is ``k`` times smaller per side while the final map — and the classifier —
keeps its shape:

1. **Stem.** ``pool="stride"``: the stem's downsampling point takes a ``k``-times larger stride
   (ResNet ``conv1`` 2 → 8; a non-overlapping stem pool grows its kernel too). A ``k×k`` max/avg pool
   is inserted after the stem's pointwise chain instead when ``pool`` is ``"max"``/``"avg"``, when
   the stem has stride 1 (small-image nets) or when its pool overlaps (kernel ≠ stride).
2. **Absorb.** ``k`` is removed from later levels (coupled points change together), each level giving
   up ``gcd(remaining, its stride)``; :class:`AbsorbError` when ``k`` does not fit. ``absorb="stem"``
   (the paper's choice, default) takes it from the stem pools first (ResNet's maxpool, made redundant
   by the larger stem stride), then latest level first: only the stem output shrinks by the full
   ``k``, later stages by ``k / (stem pool stride)``. ``absorb="latest"`` takes it latest level first:
   every stage before the absorbing levels shrinks by ``k`` (more aggressive, lower peak when the
   teacher peaks after the stem, e.g. ResNet50 and DenseNet at ``k=2``).
3. Every point's new stride follows from the per-node gains (``k`` after the stem, divided at each
   absorbing level), so shortcuts that skip levels stay consistent. Removing downsampling sets the
   stride to 1 and keeps kernel and padding (a non-overlapping pool becomes a 1×1 pool): sizes stay.
   A weight-free module called at places that need different strides (a reused ``self.pool``) is
   split per call site (``pool``, ``pool_1``); a shared module with weights is refused.
4. The rewrite is verified by propagating shapes again: the outputs must keep the teacher's shapes.

Reproduces ReDistill: ResNet18 at ``k=4`` gets strides [conv1, maxpool, layer1..4] = [8, 1, 1, 2, 2, 1].

**Stage map rule.** Feature points are stage outputs (the exit of each region, see
:mod:`passes.downsampling`) plus an inserted stem pool. Every student feature point whose spatial
size shrank is paired (``position="output"``) with the teacher feature point of *equal* size (the
deepest one on ties; no pair when no teacher map has that size). A paired stage whose preceding
feature point shrank too also gets an ``"input"`` pair: a second RED block transforms that point's
output on its way into the stage (after the preceding stage's output block), matched to the teacher
map of its size — ReDistill's blocks at the input and output of each matched layer.

Example:
    >>> import torch
    >>> from memplan.zoo import create_model
    >>> s = aggressive_pool(create_model("resnet18"), torch.empty(1, 3, 224, 224), factor=4)
    >>> [(lv.label, lv.teacher, lv.student) for lv in s.strides]  # doctest: +NORMALIZE_WHITESPACE
    [('conv1', 2, 8), ('maxpool', 2, 1), ('layer2.0', 2, 2), ('layer3.0', 2, 2), ('layer4.0', 2, 1)]
    >>> s.module(torch.zeros(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
    >>> [(p.student, p.teacher, p.size) for p in s.stage_map.outputs][:2]
    [('relu', 'layer2_1_relu_1', (28, 28)), ('layer1_1_relu_1', 'layer2_1_relu_1', (28, 28))]
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import nn

from memplan.capture import META_KEY, capture
from memplan.errors import MemplanError
from memplan.io import write_text_atomic
from passes.downsampling import (
    KIND_RULES,
    AbsorbError,
    DownsamplingAnalysis,
    Geometry,
    PassError,
    Size,
    analyze_downsampling,
    deploy_peak,
    op_kind,
    read_geometry,
    write_geometry,
)

__all__ = [
    "ABSORB", "POOLS", "InsertPool", "LevelStride", "Recipe", "Restride", "StageMap", "StagePair", "Student",
    "WeightTransfer", "aggressive_pool", "apply_recipe", "build_student", "plan_student", "transfer_weights",
]

POOLS = ("stride", "max", "avg")
ABSORB = ("stem", "latest")
_POOL_KIND = {"max": "max_pool", "avg": "avg_pool", "stride": "max_pool"}  # stride: fallback pool kind
_POOL_MODULES: dict[str, type[nn.Module]] = {"max_pool": nn.MaxPool2d, "avg_pool": nn.AvgPool2d}
STEM_POOL = "stem_pool"


# ------------------------------------------------------------------------------------------ recipe
def _node(nodes: dict[str, fx.Node], name: str) -> fx.Node:
    if name not in nodes:
        raise PassError(f"recipe does not match the model: it has no node '{name}'")
    return nodes[name]


@dataclass(frozen=True)
class Restride:
    """Give one downsampling op a new geometry (stride, and kernel for a non-overlapping pool)."""

    node: str
    target: str
    kind: str
    old: Geometry
    new: Geometry
    action: ClassVar[str] = "restride"

    def apply(self, gm: fx.GraphModule, nodes: dict[str, fx.Node]) -> None:
        node = _node(nodes, self.node)
        kind = op_kind(gm, node)
        found = read_geometry(gm, node) if kind else None
        if kind != self.kind or found not in (self.old, self.new):  # new: a shared module, already done
            raise PassError(
                f"recipe does not match the model at node '{self.node}': expected {self.kind} {self.old}, "
                f"found {kind} {found}"
            )
        write_geometry(gm, node, self.new)

    def describe(self) -> str:
        kernel = f", kernel {self.old.kernel} -> {self.new.kernel}" if self.old.kernel != self.new.kernel else ""
        return f"{self.target} ({self.kind}): stride {self.old.stride} -> {self.new.stride}{kernel}"

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "node": self.node, "target": self.target, "kind": self.kind,
                "old": asdict(self.old), "new": asdict(self.new)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Restride:
        return cls(d["node"], d["target"], d["kind"], Geometry(**d["old"]), Geometry(**d["new"]))


@dataclass(frozen=True)
class InsertPool:
    """Insert a non-overlapping ``size×size`` max/avg pool module ``name`` after node ``after``."""

    after: str
    name: str
    kind: str  # "max_pool" or "avg_pool"
    size: int
    action: ClassVar[str] = "insert_pool"

    def apply(self, gm: fx.GraphModule, nodes: dict[str, fx.Node]) -> None:
        node = _node(nodes, self.after)
        if hasattr(gm, self.name):
            raise PassError(f"cannot insert pool '{self.name}': the model already has an attribute of that name")
        gm.add_submodule(self.name, _POOL_MODULES[self.kind](self.size, self.size))
        with gm.graph.inserting_after(node):
            pool = gm.graph.call_module(self.name, (node,))
        node.replace_all_uses_with(pool, delete_user_cb=lambda user: user is not pool)

    def describe(self) -> str:
        return f"{self.name} ({self.kind}): inserted after {self.after}, {self.size}x{self.size} stride {self.size}"

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "after": self.after, "name": self.name, "kind": self.kind, "size": self.size}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InsertPool:
        return cls(d["after"], d["name"], d["kind"], int(d["size"]))


Change = Restride | InsertPool
_CHANGES: dict[str, type[Restride] | type[InsertPool]] = {c.action: c for c in (Restride, InsertPool)}


@dataclass(frozen=True)
class Recipe:
    """The rewrite decisions of a student, JSON round-trippable and re-applicable to the teacher.

    >>> r = Recipe("Net", (1, 3, 32, 32), 2, "stride", "stem", (Restride("c", "c", "conv", Geometry(3, 1), Geometry(3, 2)),))
    >>> Recipe.from_json(json.loads(json.dumps(r.to_json()))) == r
    True
    """

    model: str
    input_shape: tuple[int, ...]
    factor: int
    pool: str
    absorb: str
    changes: tuple[Change, ...]
    FORMAT: ClassVar[str] = "memplan-student-recipe/1"

    def to_json(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "model": self.model, "input_shape": list(self.input_shape),
                "factor": self.factor, "pool": self.pool, "absorb": self.absorb,
                "changes": [c.to_json() for c in self.changes]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Recipe:
        if not isinstance(d, dict) or d.get("format") != cls.FORMAT:
            raise PassError(f"not a student recipe (expected format '{cls.FORMAT}')")
        try:
            changes = tuple(_CHANGES[c["action"]].from_json(c) for c in d["changes"])
            return cls(str(d["model"]), tuple(int(x) for x in d["input_shape"]), int(d["factor"]), str(d["pool"]),
                       str(d["absorb"]), changes)
        except (KeyError, TypeError, ValueError) as e:
            raise PassError(f"malformed student recipe: {type(e).__name__}: {e}") from e

    def save(self, path: str | Path) -> None:
        """Write the recipe as JSON (atomically)."""
        write_text_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe written by :meth:`save`."""
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise PassError(f"cannot read recipe '{path}': {e}") from e


# ------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class StagePair:
    """A student feature point and the teacher feature point of equal spatial size (a RED site)."""

    stage: int  # index of the student feature point (stage) the pair belongs to
    position: str  # "output": after the stage's output; "input": on the stage's input
    student: str  # student fx node whose output the RED block transforms
    teacher: str  # teacher fx node of the same spatial size: the distillation target
    size: Size
    channels: int
    teacher_channels: int

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "size": list(self.size)}


@dataclass(frozen=True)
class StageMap:
    """Student ↔ teacher feature points of equal spatial size, in execution order (module docstring)."""

    pairs: tuple[StagePair, ...]
    unmatched: tuple[str, ...] = ()  # shrunk student feature points without a teacher map of equal size

    @property
    def outputs(self) -> tuple[StagePair, ...]:
        return tuple(p for p in self.pairs if p.position == "output")

    def for_placement(self, placement: str) -> tuple[StagePair, ...]:
        """Pairs a RED placement uses: ``"output"`` or ``"input+output"``."""
        if placement not in ("output", "input+output"):
            raise PassError(f"unknown RED placement '{placement}' (use input+output or output)")
        return self.pairs if placement == "input+output" else self.outputs

    def to_json(self) -> list[dict[str, Any]]:
        return [p.to_json() for p in self.pairs]


@dataclass(frozen=True)
class LevelStride:
    """Stride of one downsampling level (or of the inserted stem pool) in teacher and student."""

    label: str
    teacher: int
    student: int


@dataclass(frozen=True)
class WeightTransfer:
    """What :func:`transfer_weights` copied from the teacher's state_dict, and what it could not."""

    copied: tuple[str, ...]
    mismatched: tuple[str, ...]  # same name, other shape
    missing: tuple[str, ...]  # student entries the teacher lacks (new modules)
    unused: tuple[str, ...]  # teacher entries the student lacks (modules forward never calls)

    @property
    def complete(self) -> bool:
        return not (self.mismatched or self.missing or self.unused)

    def summary(self) -> str:
        """One line: how many tensors came over and which did not."""
        total = len(self.copied) + len(self.mismatched) + len(self.missing)
        left = [f"{label}: {', '.join(names)}" for label, names in
                (("shape differs", self.mismatched), ("new", self.missing), ("teacher-only", self.unused)) if names]
        return f"{len(self.copied)}/{total} student tensors copied from the teacher" + (
            "; not transferred: " + "; ".join(left) if left else "")


@dataclass
class Student:
    """An aggressive-pool student: ``module`` keeps the teacher's module paths (and weights).

    ``peak_bytes`` is its deploy-form peak at the input it was built for (RED blocks not included).
    """

    module: fx.GraphModule
    recipe: Recipe
    stage_map: StageMap
    strides: tuple[LevelStride, ...]
    transfer: WeightTransfer
    peak_bytes: int


# ------------------------------------------------------------------------------------------ planning
def plan_student(
    analysis: DownsamplingAnalysis, factor: int, pool: str = "stride", absorb: str = "stem"
) -> Recipe:
    """Decide the rewrite of a factor-``factor`` student (module docstring) without touching a model.

    >>> import torch
    >>> from memplan.zoo import create_model
    >>> a = analyze_downsampling(create_model("resnet_tiny"), torch.empty(1, 1, 28, 28))
    >>> [c.to_json()["action"] for c in plan_student(a, 4).changes]
    ['restride', 'restride', 'restride', 'restride', 'insert_pool']
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise PassError(f"factor must be a positive integer (2, 4 or 8), got {factor!r}")
    if pool not in POOLS:
        raise PassError(f"unknown pool '{pool}' (use {', '.join(POOLS)})")
    if absorb not in ABSORB:
        raise PassError(f"unknown absorb order '{absorb}' (use {', '.join(ABSORB)})")
    if factor == 1:
        return Recipe(analysis.model, analysis.input_shape, factor, pool, absorb, ())
    levels, stem = analysis.levels, analysis.stem
    gain = dict.fromkeys(analysis.order, Fraction(1))
    reads = {p.node: p.input for lv in levels for p in lv.points}
    stem_points = list(levels[stem.level].points) if stem.level is not None else []
    insert = None
    if pool == "stride" and stem_points and all(KIND_RULES[p.kind].can_grow(p.geometry) for p in stem_points):
        entry = analysis.descendants(p.node for p in stem_points)
    else:
        name = STEM_POOL
        while name in analysis.taken_names:
            name += "_"
        insert = InsertPool(stem.end, name, _POOL_KIND[pool], factor)
        entry = analysis.descendants(analysis.dag.successors(stem.end))
        reads = {p: name if src == stem.end else src for p, src in reads.items()}
        gain[name] = Fraction(factor)
    for n in entry:
        gain[n] *= factor
    remaining = factor
    first = stem.pools if absorb == "stem" else ()
    later = [levels[i] for i in first] + [lv for lv in reversed(levels) if lv.index not in first]
    later = [lv for lv in later if lv.index != stem.level and all(p.node in entry for p in lv.points)]
    for lv in later:
        if remaining == 1:
            break
        f = math.gcd(remaining, *(p.stride for p in lv.points))
        for n in analysis.descendants(p.node for p in lv.points):
            gain[n] /= f
        remaining //= f
    if remaining > 1:
        raise AbsorbError(
            f"factor {factor} cannot be absorbed by {analysis.model} at input "
            f"{'x'.join(map(str, analysis.input_shape))}: the downsampling after the stem "
            f"({', '.join(f'{lv.label} x{lv.stride}' for lv in later) or 'none'}) gives up only "
            f"x{factor // remaining}, so the final feature map would shrink; use a factor of at most "
            f"{factor // remaining}"
        )
    changes: list[Change] = []
    for p in (p for lv in levels for p in lv.points):
        new = p.stride * gain[p.node] / gain[reads[p.node]]
        if new.denominator != 1 or new < 1:
            raise PassError(f"factor {factor} would give {p.target} a stride of {new}; "
                            "its branches downsample too differently to absorb the factor")
        if new != p.stride:
            changes.append(Restride(p.node, p.target, p.kind, p.geometry,
                                    KIND_RULES[p.kind].restride(p.geometry, int(new))))
    changes += [insert] if insert else []
    return Recipe(analysis.model, analysis.input_shape, factor, pool, absorb, tuple(changes))


# ------------------------------------------------------------------------------------------ building
def _example(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [example_inputs] if isinstance(example_inputs, torch.Tensor) else list(example_inputs)


def _unshare_modules(gm: fx.GraphModule, changes: Sequence[Change]) -> None:
    """Give each call site of a weight-free module (a reused ``self.pool``) its own copy when the
    recipe re-strides the sites differently; the copies are named ``<path>_<i>`` (``pool_1``)."""
    new_of = {c.node: c.new for c in changes if isinstance(c, Restride)}
    sites: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            sites.setdefault(str(n.target), []).append(n)
    for target, calls in sites.items():
        if len({new_of.get(n.name) for n in calls}) < 2:
            continue
        module = gm.get_submodule(target)
        if next(iter(module.state_dict()), None) is not None:
            raise PassError(f"module '{target}' is called at {len(calls)} places ({', '.join(n.name for n in calls)}) "
                            "that need different strides, and it has weights, so it cannot be split")
        parent_path, _, leaf = target.rpartition(".")
        parent = gm.get_submodule(parent_path)
        for i, n in enumerate(calls[1:], 1):
            name = f"{leaf}_{i}"
            while hasattr(parent, name):
                name += "_"
            parent.add_module(name, copy.deepcopy(module))
            n.target = f"{parent_path}.{name}" if parent_path else name


def build_student(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    recipe: Recipe,
    analysis: DownsamplingAnalysis,
) -> Student:
    """Apply ``recipe`` to a copy of ``model`` (analysed as ``analysis``) and verify the result."""
    inputs = _example(example_inputs)
    root = copy.deepcopy(model)
    gm = fx.GraphModule(root, fx.Tracer().trace(root), class_name=analysis.model)
    nodes = {n.name: n for n in gm.graph.nodes}
    _unshare_modules(gm, recipe.changes)
    for change in recipe.changes:
        change.apply(gm, nodes)
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    try:
        check = capture(gm, inputs, method="fx")
    except MemplanError as e:
        raise PassError(f"the factor-{recipe.factor} student of {analysis.model} does not run: {e}") from e
    meta = {n.name: n.meta[META_KEY] for n in check.gm.graph.nodes if META_KEY in n.meta}
    out_shapes = tuple(t.shape for t in meta[next(n.name for n in check.gm.graph.nodes if n.op == "output")].outputs)
    if out_shapes != analysis.output_shapes:
        raise PassError(f"the factor-{recipe.factor} student of {analysis.model} outputs {list(out_shapes)}, "
                        f"the teacher {list(analysis.output_shapes)}; the rewrite would change the classifier")
    gm.train(model.training)
    inserted = next((c for c in recipe.changes if isinstance(c, InsertPool)), None)
    return Student(
        module=gm,
        recipe=recipe,
        stage_map=_stage_map(analysis, meta, [n.name for n in gm.graph.nodes], inserted),
        strides=_strides(analysis, recipe, inserted),
        transfer=transfer_weights(model, gm),
        peak_bytes=deploy_peak(check),
    )


def _strides(analysis: DownsamplingAnalysis, recipe: Recipe, inserted: InsertPool | None) -> tuple[LevelStride, ...]:
    new = {c.node: c.new.stride for c in recipe.changes if isinstance(c, Restride)}
    rows = [LevelStride(lv.label, lv.stride, max(new.get(p.node, p.stride) for p in lv.points))
            for lv in analysis.levels]
    if inserted is not None:
        stem = analysis.stem.level
        rows.insert(0 if stem is None else stem + 1, LevelStride(inserted.name, 1, inserted.size))
    return tuple(rows)


def _stage_map(
    analysis: DownsamplingAnalysis, meta: dict[str, Any], order: list[str], inserted: InsertPool | None
) -> StageMap:
    teacher_at: dict[Size, str] = {}
    for name in analysis.feature_points:  # execution order: the deepest point of a size wins
        teacher_at[analysis.sizes[name]] = name
    position = {name: i for i, name in enumerate(order)}
    points = sorted([*analysis.feature_points, *([inserted.name] if inserted else [])], key=position.__getitem__)
    student_size = {name: tuple(meta[name].outputs[0].shape[2:]) for name in points}
    teacher_size = {**analysis.sizes, **({inserted.name: analysis.sizes[inserted.after]} if inserted else {})}

    def pair(stage: int, position: str, name: str) -> StagePair:
        size, teacher = student_size[name], teacher_at[student_size[name]]
        return StagePair(stage, position, name, teacher, size, meta[name].outputs[0].shape[1],
                         analysis.channels[teacher])

    shrunk = [student_size[name] != teacher_size[name] for name in points]
    pairs, unmatched = [], []
    for stage, name in enumerate(points):
        if not shrunk[stage]:
            continue
        if student_size[name] not in teacher_at:
            unmatched.append(name)
            continue
        pairs.append(pair(stage, "output", name))
        if stage > 0 and shrunk[stage - 1] and student_size[points[stage - 1]] in teacher_at:
            pairs.append(pair(stage, "input", points[stage - 1]))
    pairs.sort(key=lambda p: (position[p.student], p.position != "output"))
    return StageMap(tuple(pairs), tuple(unmatched))


def transfer_weights(teacher: nn.Module, student: nn.Module) -> WeightTransfer:
    """Copy every teacher state_dict entry whose name and shape the student shares; report the rest.

    >>> from memplan.zoo import create_model
    >>> t = transfer_weights(create_model("resnet_tiny"), create_model("resnet_tiny", strides=[1, 4, 1, 1, 1]))
    >>> t.complete, len(t.copied)
    (True, 92)
    """
    src, dst = teacher.state_dict(), student.state_dict()
    same = {k: v for k, v in src.items() if k in dst and dst[k].shape == v.shape}
    student.load_state_dict(same, strict=False)
    return WeightTransfer(
        copied=tuple(same),
        mismatched=tuple(f"{k} {tuple(src[k].shape)}->{tuple(dst[k].shape)}"
                         for k in dst if k in src and k not in same),
        missing=tuple(k for k in dst if k not in src),
        unused=tuple(k for k in src if k not in dst),
    )


# ------------------------------------------------------------------------------------------ entry points
def aggressive_pool(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    factor: int = 4,
    pool: str = "stride",
    absorb: str = "stem",
) -> Student:
    """The factor-``factor`` aggressive-pooling student of ``model`` (module docstring).

    ``example_inputs`` fixes the resolution the rewrite is verified at (meta tensors are fine).
    ``factor=1`` returns an unchanged copy.
    """
    analysis = analyze_downsampling(model, example_inputs)
    return build_student(model, example_inputs, plan_student(analysis, factor, pool, absorb), analysis)


def apply_recipe(
    model: nn.Module, recipe: Recipe, example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None
) -> Student:
    """Re-apply a saved :class:`Recipe` to ``model`` (at the recipe's input shape unless given).

    >>> import torch
    >>> from memplan.zoo import create_model
    >>> s = aggressive_pool(create_model("resnet_tiny"), torch.empty(1, 1, 28, 28), factor=4)
    >>> apply_recipe(create_model("resnet_tiny"), s.recipe).recipe == s.recipe
    True
    """
    inputs = example_inputs if example_inputs is not None else torch.empty(recipe.input_shape, device="meta")
    return build_student(model, inputs, recipe, analyze_downsampling(model, inputs))
