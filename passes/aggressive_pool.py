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

**Encoder-decoders** (UNets, FPN/HRNet-style fusion, diffusion denoisers: graphs with upsampling
points). Every node gets a *gain* (teacher size / student size per side, :func:`_gains`): the stem
conv takes stride ``k`` (``pool="stride"``, even at stride 1: ReDistill's DDPM head), the deepest
levels absorb ``k`` as above, and each equal-resolution region of the teacher keeps one gain, so a
decoder's upsampling that meets its skip (add or concat) gets the factor that keeps the join matched
(:class:`Rescale`: a transposed conv's stride and kernel, fresh weights when the kernel changes; an
interpolation's scale, removed at x1). Which upsampling matches which downsampling follows from the
regions (networkx components of equal-size edges), not from names. A join no factor can keep matched
is refused naming the node. The output comes back at ``k`` times smaller and a :class:`TailUpsample`
(``tail="conv_transpose"`` or ``"upsample"``) restores it. ReDistill's k=2 DDPM student comes out as
head stride 2, deepest DownSample stride 1, its UpSample without interpolation, a stride-2 tail.
The stage map of an encoder-decoder lists candidate RED sites (:class:`Site`: head output, input and
output of every shrunk encoder and decoder block — maximal module calls at one resolution — and the
tail input), each paired with the teacher's last map of equal size on the same side, and names the
paper's placements (``"6-site"``, ``"2-site"``) for the block-attachment pass.

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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import nn

from memplan.capture import META_KEY
from memplan.errors import describe_error
from memplan.io import write_text_atomic
from passes.downsampling import (
    KIND_RULES,
    AbsorbError,
    DownsamplingAnalysis,
    Geometry,
    PassError,
    Point,
    Size,
    UpsamplingError,
    analyze_downsampling,
    deploy_peak,
    normalized_kwargs,
    op_kind,
    read_geometry,
    set_arguments,
    up_kind,
    write_geometry,
)
from passes.graph_capture import export_graph, propagate
from passes.layout import layout_of, propagate_layout, spatial_size

__all__ = [
    "ABSORB", "ENCDEC_PLACEMENTS", "POOLS", "TAILS", "InsertPool", "InsertTail", "LevelStride", "Recipe", "Rescale",
    "Restride", "Site", "StageMap", "StagePair", "Student", "TailUpsample", "WeightTransfer", "aggressive_pool",
    "apply_recipe", "build_student", "plan_student", "transfer_weights",
]

POOLS = ("stride", "max", "avg")
ABSORB = ("stem", "latest")
_POOL_KIND = {"max": "max_pool", "avg": "avg_pool", "stride": "max_pool"}  # stride: fallback pool kind
_POOL_MODULES: dict[str, type[nn.Module]] = {"max_pool": nn.MaxPool2d, "avg_pool": nn.AvgPool2d}
STEM_POOL = "stem_pool"
TAIL = "tail"
TAILS = ("conv_transpose", "upsample")
ENCDEC_PLACEMENTS = ("6-site", "2-site", "all-sites")


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
        if d["kind"] not in _POOL_MODULES:
            raise ValueError(f"unknown pool kind {d['kind']!r} (use {', '.join(_POOL_MODULES)})")
        return cls(d["after"], d["name"], d["kind"], int(d["size"]))


def _fraction(value: object) -> Fraction:
    return Fraction(str(value))


@dataclass(frozen=True)
class Rescale:
    """Give one upsampling op a new factor (``new == 1`` removes an interpolation); ``size`` is the new
    output size of an interpolation whose size is a constant."""

    node: str
    target: str
    kind: str  # "conv_transpose" or "interpolate"
    old: Fraction
    new: Fraction
    size: Size | None = None
    action: ClassVar[str] = "rescale"

    def apply(self, gm: fx.GraphModule, nodes: dict[str, fx.Node]) -> None:
        node = _node(nodes, self.node)
        if up_kind(gm, node) != self.kind:
            raise PassError(f"recipe does not match the model at node '{self.node}': expected {self.kind}, "
                            f"found {up_kind(gm, node)}")
        if self.kind == "interpolate" and self.new == 1:
            node.replace_all_uses_with(node.all_input_nodes[0])
            gm.graph.erase_node(node)
            return
        if node.op == "call_module":
            _rescale_module(gm.get_submodule(str(node.target)), self, node)
            return
        kw = normalized_kwargs(node)
        if self.kind == "conv_transpose":
            _rescale_functional_conv_transpose(gm, node, kw, self)
            set_arguments(node, kw)
            return
        for key in ("size", "output_size", "scale_factor", "scale_factors"):
            if kw.get(key) is None:
                continue
            if key.startswith("scale"):
                kw[key] = [float(self.new)] * 2 if isinstance(kw[key], (list, tuple)) else float(self.new)
            elif self.size is not None:
                kw[key] = list(self.size)
        set_arguments(node, kw)

    def describe(self) -> str:
        what = "removed" if self.new == 1 and self.kind == "interpolate" else f"x{self.old} -> x{self.new}"
        return f"{self.target} ({self.kind}): upsampling {what}"

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "node": self.node, "target": self.target, "kind": self.kind,
                "old": str(self.old), "new": str(self.new), "size": list(self.size) if self.size else None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Rescale:
        return cls(d["node"], d["target"], d["kind"], _fraction(d["old"]), _fraction(d["new"]),
                   tuple(d["size"]) if d.get("size") else None)


def _new_kernel(node: fx.Node, change: Rescale, kernel: Sequence[int], stride: Sequence[int],
                padding: Sequence[int], output_padding: Sequence[int]) -> int:
    """Kernel of a transposed conv that upsamples exactly ``x change.new`` where it upsampled exactly
    ``x stride`` (``kernel - 2 * padding + output_padding == stride``; padding kept, no output padding)."""
    k, s, p, op = (int(v[0]) if isinstance(v, (list, tuple)) else int(v) for v in (kernel, stride, padding, output_padding))
    if k - 2 * p + op != s or any(len(set(v)) > 1 for v in (kernel, stride, padding) if isinstance(v, (list, tuple))):
        raise PassError(f"node '{node.name}' ({change.target}) upsamples with kernel {kernel}, stride {stride}, "
                        f"padding {padding}: not an exact x{s}, so it cannot take a new stride")
    return int(change.new) + 2 * p


def _fresh(weight: torch.Tensor, kernel: int) -> nn.Parameter:
    """A new transposed-conv weight of kernel ``kernel``, initialised as torch initialises one."""
    new = nn.Parameter(weight.new_empty((*weight.shape[:2], kernel, kernel)))
    if new.device.type != "meta":
        nn.init.kaiming_uniform_(new, a=math.sqrt(5))
    return new


def _rescale_functional_conv_transpose(gm: fx.GraphModule, node: fx.Node, kw: dict, change: Rescale) -> None:
    weight = kw.get("weight")
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        raise PassError(f"node '{node.name}' upsamples with a computed transposed-conv weight; it cannot take a new stride")
    owner_path, _, attr = str(weight.target).rpartition(".")
    owner = gm.get_submodule(owner_path)
    old = getattr(owner, attr)
    kernel = _new_kernel(node, change, old.shape[-2:], kw.get("stride", 1), kw.get("padding", 0),
                         kw.get("output_padding", 0))
    kw["stride"], kw["output_padding"] = [int(change.new)] * 2, [0, 0]
    if kernel != old.shape[-1]:
        setattr(owner, attr, _fresh(old, kernel))


def _rescale_module(m: nn.Module, change: Rescale, node: fx.Node) -> None:
    if isinstance(m, nn.ConvTranspose2d):
        kernel = _new_kernel(node, change, m.kernel_size, m.stride, m.padding, m.output_padding)
        new = int(change.new)
        m.stride, m.output_padding = (new, new), (0, 0)
        if kernel != m.kernel_size[0]:  # a new weight shape: fresh weights
            m.kernel_size = (kernel, kernel)
            m.weight = _fresh(m.weight, kernel)
        return
    if getattr(m, "scale_factor", None) is not None:
        m.scale_factor = float(change.new)
    elif change.size is not None:
        m.size = change.size


class TailUpsample(nn.Module):
    """The inserted tail of an encoder-decoder student: restores the teacher's output resolution with a
    stride-``factor`` transposed conv (``kind="conv_transpose"``) or a nearest upsample and a 3×3 conv
    (``"upsample"``), ``channels -> channels``, fresh weights. Given a ``size`` (odd teacher sizes, where
    the student's map is ``ceil(size / factor)``) the result is cropped to it: a view, no copy.

    >>> TailUpsample(3, 2)(torch.zeros(1, 3, 5, 5)).shape
    torch.Size([1, 3, 10, 10])
    >>> TailUpsample(3, 2, "upsample")(torch.zeros(1, 3, 5, 5), torch.Size([1, 1, 9, 9])).shape
    torch.Size([1, 3, 9, 9])
    """

    def __init__(self, channels: int, factor: int, kind: str = "conv_transpose") -> None:
        super().__init__()
        if kind not in TAILS:
            raise PassError(f"unknown tail '{kind}' (use {', '.join(TAILS)})")
        self.up = (nn.ConvTranspose2d(channels, channels, factor, factor) if kind == "conv_transpose" else
                   nn.Sequential(nn.Upsample(scale_factor=factor), nn.Conv2d(channels, channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        y = self.up(x)
        return y if size is None else y[..., : size[-2], : size[-1]]


@dataclass(frozen=True)
class InsertTail:
    """Insert a :class:`TailUpsample` ``name`` on the model output computed by ``after``."""

    after: str
    name: str
    kind: str  # "conv_transpose" or "upsample"
    factor: int
    channels: int
    ref: str | None = None  # a map of the teacher's output size, when the tail must crop to its size
    action: ClassVar[str] = "insert_tail"

    def apply(self, gm: fx.GraphModule, nodes: dict[str, fx.Node]) -> None:
        node = _node(nodes, self.after)
        if hasattr(gm, self.name):
            raise PassError(f"cannot insert tail '{self.name}': the model already has an attribute of that name")
        device = next((p.device for p in gm.parameters()), torch.device("cpu"))
        with torch.device(device):
            gm.add_submodule(self.name, TailUpsample(self.channels, self.factor, self.kind))
        args: tuple[fx.Node, ...] = (node,)
        if self.ref is not None:  # its size only: reading it at once keeps the map itself from living on
            ref = _node(nodes, self.ref)
            with gm.graph.inserting_after(ref):
                args = (node, gm.graph.call_method("size", (ref,)))
        output = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(output):
            tail = gm.graph.call_module(self.name, args)
        output.replace_input_with(node, tail)

    def describe(self) -> str:
        return f"{self.name} ({self.kind}): inserted on the output {self.after}, x{self.factor}, {self.channels} channels"

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "after": self.after, "name": self.name, "kind": self.kind,
                "factor": self.factor, "channels": self.channels, "ref": self.ref}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InsertTail:
        return cls(d["after"], d["name"], d["kind"], int(d["factor"]), int(d["channels"]), d.get("ref"))


Change = Restride | InsertPool | Rescale | InsertTail
_CHANGES: dict[str, type[Change]] = {c.action: c for c in (Restride, InsertPool, Rescale, InsertTail)}


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
    # why the student may not run, found while planning (an upsampling of a rounded size); not saved
    risks: tuple[str, ...] = field(default=(), compare=False)
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
            recipe = cls(str(d["model"]), tuple(int(x) for x in d["input_shape"]), int(d["factor"]), str(d["pool"]),
                         str(d["absorb"]), changes)
        except (KeyError, TypeError, ValueError) as e:
            raise PassError(f"malformed student recipe: {type(e).__name__}: {e}") from None
        if recipe.pool not in POOLS or recipe.absorb not in ABSORB:
            raise PassError(f"malformed student recipe: pool '{recipe.pool}' / absorb '{recipe.absorb}' is not one of "
                            f"{', '.join(POOLS)} / {', '.join(ABSORB)}")
        return recipe

    def save(self, path: str | Path) -> None:
        """Write the recipe as JSON (atomically)."""
        write_text_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe written by :meth:`save`."""
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
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
class Site:
    """A candidate RED site of an encoder-decoder student: the input or output of its head, of an
    encoder or decoder block, or of its tail, paired with the teacher map of equal size on the same side."""

    role: str  # "head", "encoder", "decoder" or "tail"
    block: str  # module path of the block ("" for head and tail)
    position: str  # "input" or "output" of the block
    student: str  # student node whose output the RED block transforms
    teacher: str  # teacher node of equal spatial size on the same side (encoder or decoder)
    size: Size
    channels: int
    teacher_channels: int

    def pair(self, stage: int) -> StagePair:
        """This site as a :class:`StagePair` numbered ``stage`` (what the RED attachment pass reads)."""
        return StagePair(stage, self.position, self.student, self.teacher, self.size, self.channels,
                         self.teacher_channels)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "size": list(self.size)}


@dataclass(frozen=True)
class StageMap:
    """Student ↔ teacher feature points of equal spatial size, in execution order (module docstring).

    Encoder-decoder students also list every candidate RED site (``sites``) and name site selections
    (``placements``: site indices; ReDistill's ``"6-site"`` and ``"2-site"`` configs, ``"all-sites"``);
    their ``pairs`` are the 6-site selection.
    """

    pairs: tuple[StagePair, ...]
    unmatched: tuple[str, ...] = ()  # shrunk student feature points without a teacher map of equal size
    sites: tuple[Site, ...] = ()
    placements: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def outputs(self) -> tuple[StagePair, ...]:
        return tuple(p for p in self.pairs if p.position == "output")

    def placement_names(self) -> tuple[str, ...]:
        """Every placement :meth:`for_placement` accepts for this map."""
        return ("input+output", "output", *(name for name, _ in self.placements))

    def for_placement(self, placement: str) -> tuple[StagePair, ...]:
        """Pairs a RED placement uses: ``"output"``, ``"input+output"``, or a named site selection."""
        named = dict(self.placements)
        if placement in named:
            return tuple(self.sites[i].pair(i) for i in named[placement])
        if placement not in ("output", "input+output"):
            raise PassError(f"unknown RED placement '{placement}' (use {', '.join(self.placement_names())})")
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
    analysis: DownsamplingAnalysis, factor: int, pool: str = "stride", absorb: str = "stem",
    tail: str = "conv_transpose",
) -> Recipe:
    """Decide the rewrite of a factor-``factor`` student (module docstring) without touching a model.

    >>> import torch
    >>> from memplan.zoo import create_model
    >>> a = analyze_downsampling(create_model("resnet_tiny"), torch.empty(1, 1, 28, 28))
    >>> [c.to_json()["action"] for c in plan_student(a, 4).changes]
    ['restride', 'restride', 'restride', 'restride', 'insert_pool']
    >>> u = analyze_downsampling(create_model("unet_small"), torch.empty(1, 3, 64, 64))
    >>> [c.describe() for c in plan_student(u, 2).changes]  # doctest: +NORMALIZE_WHITESPACE
    ['encoders.0.0.0 (conv): stride 1 -> 2', 'pools.2 (max_pool): stride 2 -> 1, kernel 2 -> 1',
     'upsamples.0 (conv_transpose): upsampling x2 -> x1', 'tail (conv_transpose): inserted on the output head, x2, 2 channels']
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise PassError(f"factor must be a positive integer (2, 4 or 8), got {factor!r}")
    if pool not in POOLS:
        raise PassError(f"unknown pool '{pool}' (use {', '.join(POOLS)})")
    if absorb not in ABSORB:
        raise PassError(f"unknown absorb order '{absorb}' (use {', '.join(ABSORB)})")
    if tail not in TAILS:
        raise PassError(f"unknown tail '{tail}' (use {', '.join(TAILS)})")
    if factor == 1:
        return Recipe(analysis.model, analysis.input_shape, factor, pool, absorb, ())
    levels = analysis.levels
    insert, stem_conv, gain = _absorb(analysis, factor, pool, absorb)
    read = _reader(gain, factor, insert)
    changes: list[Change] = []
    for p in [*([stem_conv] if stem_conv else []), *(p for lv in levels for p in lv.points)]:
        new = p.stride * gain[p.node] / read(p.input)
        if new.denominator != 1 or new < 1 or (new != p.stride and KIND_RULES[p.kind].fixed):
            raise PassError(f"factor {factor} would give {p.target} ({p.kind}) a stride of {new}; "
                            "its branches downsample too differently to absorb the factor")
        if new != p.stride:
            changes.append(Restride(p.node, p.target, p.kind, p.geometry,
                                    KIND_RULES[p.kind].restride(p.geometry, int(new))))
    changes += [insert] if insert else []
    risks: list[str] = []
    changes += _rescales(analysis, gain, read, risks)
    changes += _tails(analysis, gain, tail)
    return Recipe(analysis.model, analysis.input_shape, factor, pool, absorb, tuple(changes), tuple(risks))


def _absorb(
    analysis: DownsamplingAnalysis, factor: int, pool: str, absorb: str
) -> tuple[InsertPool | None, Point | None, dict[str, Fraction | None]]:
    """Where the stem takes the factor (an inserted pool, or a stride-1 encoder-decoder stem conv), and
    each node's gain (:func:`_gains`) once the later levels have absorbed it."""
    levels, stem = analysis.levels, analysis.stem
    stem_points = list(levels[stem.level].points) if stem.level is not None else []
    insert, stem_conv = None, None
    if pool == "stride" and stem_points and all(KIND_RULES[p.kind].can_grow(p.geometry) for p in stem_points):
        entry_nodes = [p.node for p in stem_points]
    elif pool == "stride" and not stem_points and analysis.encoder_decoder:
        # an encoder-decoder's full-resolution maps are what the student must avoid: the stem conv
        # itself takes the stride (ReDistill's DDPM head, stride 2), the tail restores the size
        stem_conv = _stem_conv_point(analysis)
        entry_nodes = [stem_conv.node]
    else:
        name = STEM_POOL
        while name in analysis.taken_names:
            name += "_"
        insert = InsertPool(stem.end, name, _POOL_KIND[pool], factor)
        entry_nodes = list(analysis.dag.successors(stem.end))
    entry = analysis.descendants(entry_nodes)
    remaining = factor
    first = stem.pools if absorb == "stem" else ()
    later = [levels[i] for i in first] + [lv for lv in reversed(levels) if lv.index not in first]
    later = [lv for lv in later if lv.index != stem.level and all(p.node in entry for p in lv.points)]
    fixed = [lv for lv in later if any(KIND_RULES[p.kind].fixed for p in lv.points)]
    later = [lv for lv in later if lv not in fixed]
    absorbed: dict[int, int] = {}
    for lv in later:
        if remaining == 1:
            break
        f = math.gcd(remaining, *(p.stride for p in lv.points))
        absorbed[lv.index] = f
        remaining //= f
    if remaining > 1:
        kept = ", ".join(f"{lv.label} x{lv.stride}" for lv in sorted(fixed, key=lambda v: v.index))
        kept = f"; kept as they are, space-to-depth: {kept}" if kept else ""
        raise AbsorbError(
            f"factor {factor} cannot be absorbed by {analysis.model} at input "
            f"{'x'.join(map(str, analysis.input_shape))}: the downsampling after the stem "
            f"({', '.join(f'{lv.label} x{lv.stride}' for lv in later) or 'none'}{kept}) gives up only "
            f"x{factor // remaining}, so the final feature map would shrink; use a factor of at most "
            f"{factor // remaining}"
        )
    gain = _gains(analysis, factor, set(entry_nodes) if insert is None else set(), insert, entry, absorbed)
    return insert, stem_conv, gain


def student_gains(analysis: DownsamplingAnalysis, recipe: Recipe) -> dict[str, Fraction | None]:
    """Per teacher node, how many times smaller per side the student's map is (None: not a map that
    follows the input resolution)."""
    if recipe.factor == 1:
        return {name: Fraction(1) for name in analysis.sizes}
    return _absorb(analysis, recipe.factor, recipe.pool, recipe.absorb)[2]


def _stem_conv_point(analysis: DownsamplingAnalysis) -> Point:
    gm, name = analysis.captured.gm, analysis.stem.conv
    node = next(n for n in gm.graph.nodes if n.name == name)
    src = next(a.name for a in node.all_input_nodes if a.name in analysis.sizes)
    target = str(node.target) if node.op == "call_module" else (analysis.modules.get(name) or name)
    return Point(name, target, "conv", read_geometry(gm, node), src, analysis.sizes[src], analysis.sizes[name])


def _reader(gain: dict[str, Fraction | None], factor: int, insert: InsertPool | None) -> Callable[[str], Fraction]:
    """Gain of a node as its readers see it (through an inserted stem pool)."""
    def read(name: str) -> Fraction:
        g = gain[name]
        return g * factor if insert is not None and name == insert.after else g
    return read


def _gains(
    analysis: DownsamplingAnalysis, factor: int, stem_nodes: set[str], insert: InsertPool | None,
    entry: set[str], absorbed: dict[int, int],
) -> dict[str, Fraction | None]:
    """Per node, how many times smaller (per side) the student's map is than the teacher's.

    In execution order: the model input has gain 1; the stem multiplies it by ``factor``; an absorbing
    level divides it by its share; every other op keeps the gain of its inputs, which must agree (else
    a join would meet two resolutions: refused naming the node). A region (equal-resolution part of
    the teacher, :mod:`passes.downsampling`) has one gain, fixed where the student first enters it
    behind the stem; a resampling point entering it later (a decoder's upsampling meeting its skip, a
    fusion branch) takes whatever factor reaches that gain: coupled points change together. An
    upsampling point that opens a new region lands on the gain the encoder had at that resolution.
    Maps that do not follow the resolution (global pools and what they feed) have gain None.
    """
    gm = analysis.captured.gm
    level_of = {p.node: lv.index for lv in analysis.levels for p in lv.points}
    point_input = {p.node: p.input for lv in analysis.levels for p in lv.points}
    ups = {u.node: u for u in analysis.ups}
    gain: dict[str, Fraction | None] = {}
    region_gain: dict[int, Fraction] = {}
    res_gain: dict[Size, Fraction] = {}
    read = _reader(gain, factor, insert)
    for node in gm.graph.nodes:
        name = node.name
        ins = [a.name for a in node.all_input_nodes if gain.get(a.name) is not None]
        region = analysis.region.get(name)
        if node.op == "placeholder":
            gain[name] = Fraction(1) if name in analysis.sizes else None
            continue
        meta = node.meta.get(META_KEY)
        if node.op in ("get_attr", "output") or name in analysis.globals or not ins or not (meta and meta.outputs):
            gain[name] = None
            continue
        if name in stem_nodes:
            g = read(ins[0]) * factor
        elif name in level_of or name in ups:
            src = read(ins[0]) if name in ups else read(point_input[name])
            if region in region_gain:
                g = region_gain[region]
            elif name in level_of:
                g = src / absorbed.get(level_of[name], 1)
            else:
                g = res_gain.get(analysis.sizes[name], src)
        else:
            seen = {read(a) for a in ins}
            if len(seen) > 1 and name in analysis.sizes:
                parts = ", ".join(f"'{a}' 1/{read(a)}" for a in ins)
                raise (UpsamplingError if analysis.encoder_decoder else PassError)(
                    f"node '{name}' joins maps that the factor-{factor} student cannot keep at one resolution "
                    f"({parts} of the teacher's size): no down- or upsampling between them can absorb the change"
                )
            g = read(ins[0])
        gain[name] = g
        if name in entry and region is not None and name in analysis.sizes:
            region_gain.setdefault(region, g)
            res_gain.setdefault(analysis.sizes[name], g)
    return gain


def _rescales(
    analysis: DownsamplingAnalysis, gain: dict[str, Fraction | None], read: Callable[[str], Fraction],
    risks: list[str],
) -> list[Change]:
    """New factors of the upsampling points; ``risks`` gets those that read a map of a rounded size (a
    pad or crop to the skip's size may still fix it: the built student is what tells)."""
    changes: list[Change] = []
    for u in analysis.ups:
        new = u.factor * read(u.input) / gain[u.node]
        if u.follows:
            continue
        side = [Fraction(s) / read(u.input) for s in u.in_size]
        if any(v.denominator != 1 for v in side):
            risks.append(
                f"node '{u.node}' ({u.target}) upsamples a {'x'.join(f'{float(v):g}' for v in side)} map in the "
                f"student ({u.in_size[0]}x{u.in_size[1]} / {read(u.input)}), so its output cannot meet the maps it "
                "joins; use an input size whose maps divide by the factor"
            )
        if new <= 0 or (u.kind == "conv_transpose" and new.denominator != 1):
            raise UpsamplingError(f"node '{u.node}' ({u.target}) would have to upsample x{new} for its output to meet "
                            "the maps it joins; the student cannot keep this decoder's skips matched")
        if new != u.factor:
            size = None
            if u.kind == "interpolate":
                size = tuple(math.ceil(s / gain[u.node]) for s in u.out_size)
            changes.append(Rescale(u.node, u.target, u.kind, u.factor, new, size))
    return changes


def _tails(analysis: DownsamplingAnalysis, gain: dict[str, Fraction | None], kind: str) -> list[Change]:
    """A tail per model output whose map the student left smaller than the teacher's."""
    gm = analysis.captured.gm
    output = next(n for n in gm.graph.nodes if n.op == "output")
    changes: list[Change] = []
    for node in dict.fromkeys(output.all_input_nodes):
        g = gain.get(node.name)
        if g is None or g == 1:
            continue
        if g.denominator != 1 or g < 1 or node.name not in analysis.channels:
            raise PassError(f"the student's output '{node.name}' is x{g} the teacher's size per side; only an "
                            "(N, C, H, W) output smaller by an integer factor can be restored by a tail")
        name = TAIL
        while name in analysis.taken_names or any(isinstance(c, InsertTail) and c.name == name for c in changes):
            name += "_"
        size = analysis.sizes[node.name]
        student = tuple(math.ceil(s / g) for s in size)
        ref = None
        if tuple(s * int(g) for s in student) != size:  # odd sizes: crop to a map of the teacher's output size
            ref = next((n for n, gn in gain.items() if gn == 1 and analysis.sizes.get(n) == size), None)
            if ref is None:
                raise PassError(f"the student's output '{node.name}' would be {student} x{g}, not the teacher's "
                                f"{size}, and no map of that size is left to crop it to")
        changes.append(InsertTail(node.name, name, kind, int(g), analysis.channels[node.name], ref))
    return changes


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
    """Apply ``recipe`` to a copy of ``model`` (analysed as ``analysis``) and verify the result.

    A student built on an exported graph with constant sizes (:mod:`passes.graph_capture`) that does
    not run is rebuilt on the graph exported with symbolic sizes (where the student's rounding of
    sizes the factor does not divide differs from a smaller teacher's).
    """
    try:
        return _build(model, _example(example_inputs), recipe, analysis)
    except PassError as e:
        if not analysis.static_sizes:
            raise
        first = e
    try:
        symbolic = analyze_downsampling(model, example_inputs, symbolic=True)
        return _build(model, _example(example_inputs), recipe, symbolic)
    except PassError:
        raise first from None  # why the constant-size student failed says more than the retry


def _build(model: nn.Module, inputs: list[torch.Tensor], recipe: Recipe, analysis: DownsamplingAnalysis) -> Student:
    gm = copy.deepcopy(analysis.captured.gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    _unshare_modules(gm, recipe.changes)
    for change in recipe.changes:  # reading the teacher's shapes (a computed weight's kernel)
        change.apply(gm, nodes)
    if analysis.static_sizes:
        _resize_constants(model, inputs, analysis, recipe, nodes)
    for n in gm.graph.nodes:
        n.meta.pop(META_KEY, None)
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    try:
        check = propagate(gm, inputs, analysis.method)
    except Exception as e:  # noqa: BLE001 - a rewritten graph can fail anywhere; one line
        error = UpsamplingError if recipe.risks else PassError
        cause = recipe.risks[0] if recipe.risks else describe_error(e)
        raise error(f"the factor-{recipe.factor} student of {analysis.model} does not run: {cause}") from e
    propagate_layout(check.gm)
    meta = {n.name: n.meta[META_KEY] for n in check.gm.graph.nodes if META_KEY in n.meta}
    out_shapes = tuple(t.shape for t in meta[next(n.name for n in check.gm.graph.nodes if n.op == "output")].outputs)
    if out_shapes != analysis.output_shapes:
        raise PassError(f"the factor-{recipe.factor} student of {analysis.model} outputs {list(out_shapes)}, "
                        f"the teacher {list(analysis.output_shapes)}; the rewrite would change the classifier")
    gm.train(model.training)
    inserted = next((c for c in recipe.changes if isinstance(c, InsertPool)), None)
    if analysis.encoder_decoder:
        stage_map = _encdec_stage_map(analysis, check.gm, recipe)
    else:
        stage_map = _stage_map(analysis, meta, [n.name for n in gm.graph.nodes], inserted)
    return Student(
        module=gm,
        recipe=recipe,
        stage_map=stage_map,
        strides=_strides(analysis, recipe, inserted),
        transfer=transfer_weights(model, gm),
        peak_bytes=deploy_peak(check),
    )


def _resize_constants(model: nn.Module, inputs: Sequence[torch.Tensor], analysis: DownsamplingAnalysis,
                      recipe: Recipe, nodes: dict[str, fx.Node]) -> None:
    """Give every op of an exported student the size-dependent numbers of its own resolution.

    An exported graph holds the numbers that depend on the map size as constants ("same" pads, a
    reshape back to a map, an interpolation's size; :mod:`passes.graph_capture`). The student runs a
    node whose gain is an integer g (:func:`student_gains`) on a map g times smaller, which is what the
    teacher does at an input g times smaller: each number the recipe left as the teacher had it is
    read from the teacher exported at that input. A graph that changes with the input size (control flow on a
    size) is refused naming the node.
    """
    teacher = {n.name: n for n in analysis.captured.gm.graph.nodes}
    gains = student_gains(analysis, recipe)
    by_gain: dict[Fraction, list[str]] = {}
    for name, g in gains.items():
        if g is not None and g != 1 and g.denominator == 1 and name in nodes and nodes[name].op == "call_function":
            by_gain.setdefault(g, []).append(name)
    for g, names in sorted(by_gain.items()):
        scaled = [t.new_zeros((t.shape[0], *t.shape[1:-2], *(math.ceil(d / g) for d in t.shape[-2:])))
                  if t.dim() == 4 else t for t in inputs]
        try:
            other = {n.name: n for n in export_graph(model, scaled).graph.nodes}
        except Exception as e:  # noqa: BLE001 - the teacher may not run that small
            raise PassError(f"the factor-{recipe.factor} student of {analysis.model} runs ops on maps {g}x smaller, "
                            f"and the teacher does not export at {tuple(scaled[0].shape)} to size them: "
                            f"{describe_error(e)}") from e
        for name in names:
            t, o = teacher[name], other.get(name)
            if o is None or o.target != t.target:
                raise PassError(f"the exported graph of {analysis.model} changes with the input size at node "
                                f"'{name}' (control flow on a size), so the factor-{recipe.factor} student "
                                "cannot be derived from it")
            node = nodes[name]
            node.args = _resized(node.args, t.args, o.args)
            node.kwargs = _resized(node.kwargs, t.kwargs, o.kwargs)
    for change in recipe.changes:
        if isinstance(change, Restride) and change.kind == "conv":
            _keep_same_padding(analysis, teacher, nodes, change, gains)


_PADS = (torch.ops.aten.pad.default, torch.ops.aten.constant_pad_nd.default)


def _same_pad(size: int, stride: int, kernel: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding of one side: the output is ``ceil(size / stride)``."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _keep_same_padding(analysis: DownsamplingAnalysis, teacher: dict[str, fx.Node], nodes: dict[str, fx.Node],
                       change: Restride, gains: dict[str, Fraction | None]) -> None:
    """A restrided conv whose constant zero pad was TF "SAME" for the teacher's stride gets the "SAME"
    pad of its new stride at the student's size (the exported graph fixed the teacher's numbers)."""
    conv = teacher[change.node]
    pad = conv.args[0] if conv.args and isinstance(conv.args[0], fx.Node) else None
    if pad is None or pad.target not in _PADS or len(pad.users) != 1 or pad.args[0].name not in analysis.sizes:
        return
    amounts, g = nodes[pad.name].args[1], gains.get(pad.args[0].name)
    kernel = tuple(conv.args[1].meta[META_KEY].outputs[0].shape[-2:]) if isinstance(conv.args[1], fx.Node) else None
    dilation = normalized_kwargs(conv).get("dilation", 1)
    dilation = tuple(dilation) if isinstance(dilation, (list, tuple)) else (dilation, dilation)
    if kernel is None or g is None or g.denominator != 1 or len(amounts) != 4 or len(dilation) != 2:
        return
    size = analysis.sizes[pad.args[0].name]
    old = [_same_pad(size[i], change.old.stride, kernel[i], dilation[i]) for i in (1, 0)]  # F.pad: last dim first
    if list(pad.args[1]) != [p for side in old for p in side]:
        return  # not "SAME" padding in the teacher: a pad of the model's own design stays
    new = [_same_pad(math.ceil(size[i] / g), change.new.stride, kernel[i], dilation[i]) for i in (1, 0)]
    nodes[pad.name].args = (nodes[pad.name].args[0], [p for side in new for p in side], *nodes[pad.name].args[2:])


def _resized(student: Any, teacher: Any, other: Any) -> Any:
    """``student`` with each integer the recipe left at the teacher's value replaced by ``other``'s."""
    if isinstance(student, bool) or not isinstance(teacher, type(student)) or not isinstance(other, type(student)):
        return student
    if isinstance(student, int):
        return other if student == teacher else student
    if isinstance(student, (list, tuple)) and len(student) == len(teacher) == len(other):
        return type(student)(_resized(a, b, c) for a, b, c in zip(student, teacher, other))
    if isinstance(student, dict) and student.keys() == teacher.keys() == other.keys():
        return {k: _resized(student[k], teacher[k], other[k]) for k in student}
    return student


def _strides(analysis: DownsamplingAnalysis, recipe: Recipe, inserted: InsertPool | None) -> tuple[LevelStride, ...]:
    new = {c.node: c.new.stride for c in recipe.changes if isinstance(c, Restride)}
    rows = [LevelStride(lv.label, lv.stride, max(new.get(p.node, p.stride) for p in lv.points))
            for lv in analysis.levels]
    if analysis.stem.conv in new and analysis.stem.level is None:  # an encoder-decoder's stride-1 stem conv
        rows.insert(0, LevelStride(analysis.modules.get(analysis.stem.conv) or analysis.stem.conv, 1,
                                   new[analysis.stem.conv]))
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


def _blocks(
    gm: fx.GraphModule, sizes: dict[str, Size], nchw: set[str], keep: Callable[[str], bool]
) -> list[tuple[str, str, str]]:
    """``(module path, input node, output node)`` of the blocks of a graph, in execution order: maximal
    module calls of two or more ops at one resolution that read one (N, C, H, W) map and give one, whose
    nodes all satisfy ``keep``."""
    calls = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    members: dict[str, list[fx.Node]] = {}
    for n in calls:
        meta = n.meta.get(META_KEY)
        parts = meta.module.split(".") if meta is not None and meta.module else []
        for i in range(1, len(parts) + 1):
            members.setdefault(".".join(parts[:i]), []).append(n)
    found: list[tuple[str, str, str]] = []
    for path, nodes in members.items():
        inside = {n.name for n in nodes}
        spatial = [n for n in nodes if n.name in sizes]
        if len(nodes) < 2 or not spatial or len({sizes[n.name] for n in spatial}) > 1 or not all(keep(n.name) for n in nodes):
            continue
        reads = {a.name for n in nodes for a in n.all_input_nodes if a.name not in inside and a.name in sizes}
        gives = {n.name for n in nodes if any(u.name not in inside for u in n.users)}
        if len(reads) == 1 and len(gives) == 1 and reads <= nchw and gives <= nchw:
            found.append((path, reads.pop(), gives.pop()))
    paths = [f[0] for f in found]
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    maximal = [f for f in found if not any(f[0].startswith(q + ".") for q in paths)]
    return sorted(maximal, key=lambda f: order[f[2]])


def _encdec_stage_map(analysis: DownsamplingAnalysis, student: fx.GraphModule, recipe: Recipe) -> StageMap:
    """Candidate RED sites of an encoder-decoder student (see :class:`StageMap`): head output, input and
    output of every encoder and decoder block left smaller than the teacher's, tail input; each paired
    with the teacher's last map of equal size on the same side (decoder = computed from an upsampling)."""
    nodes = {n.name: n for n in student.graph.nodes}
    ssize = {n: s for n, node in nodes.items() if (s := spatial_size(node)) is not None}
    nchw = {n for n, node in nodes.items() if (lay := layout_of(node)) is not None and lay.nchw}
    decoder = analysis.descendants(u.node for u in analysis.ups)
    tsizes, tchannels = analysis.sizes, analysis.channels
    shrunk = {n for n in ssize if n in tsizes and ssize[n] != tsizes[n] and n in nchw}
    inserted = {c.name for c in recipe.changes if isinstance(c, (InsertPool, InsertTail))}
    head = next((c.name for c in recipe.changes if isinstance(c, InsertPool)), analysis.stem.end)
    tail = next((c for c in recipe.changes if isinstance(c, InsertTail)), None)
    last = _tail_conv(student, nodes[tail.after]) if tail is not None else None
    tail_in = next((a.name for a in last.all_input_nodes if a.name in ssize), None) if last is not None else None
    stem_conv, last_conv = analysis.stem.conv, last.name if last is not None else None

    def keep(name: str) -> bool:
        return name not in inserted and name not in (stem_conv, last_conv) and (name in shrunk or name not in ssize)

    blocks = _blocks(student, ssize, nchw, keep)
    teacher_gm = analysis.captured.gm
    tblocks = _blocks(teacher_gm, tsizes, set(tchannels), lambda name: True)
    teacher_maps = [n for b in tblocks for n in (b[1], b[2])] + list(tchannels)
    teacher_at: dict[tuple[bool, Size], str] = {}
    for name in sorted(set(teacher_maps), key=analysis.order.__getitem__):  # the last one of a size wins
        teacher_at[(name in decoder, tsizes[name])] = name

    sites: list[Site] = []
    unmatched: list[str] = []

    def add(role: str, block: str, position: str, name: str | None, side: bool) -> int | None:
        if name is None or name not in shrunk and name not in inserted:
            return None
        teacher = teacher_at.get((side, ssize[name])) or teacher_at.get((not side, ssize[name]))
        if teacher is None:
            unmatched.append(name)
            return None
        sites.append(Site(role, block, position, name, teacher, ssize[name],
                          nodes[name].meta[META_KEY].outputs[0].shape[1], tchannels[teacher]))
        return len(sites) - 1

    head_i = add("head", "", "output", head, False)
    enc, dec = [], []
    for path, src, out in blocks:
        side = out in decoder
        pair = (add("decoder" if side else "encoder", path, "input", src, side),
                add("decoder" if side else "encoder", path, "output", out, side))
        (dec if side else enc).append(pair)
    tail_i = add("tail", "", "input", tail_in, True)
    six = [head_i, *(enc[0][:1] if enc else ()), *(enc[min(1, len(enc) - 1)][1:] if enc else ()),
           *(dec[max(-2, -len(dec))][:1] if dec else ()), *(dec[-1][1:] if dec else ()), tail_i]
    placements = (("6-site", _indices(six)), ("2-site", _indices([head_i, tail_i])),
                  ("all-sites", tuple(range(len(sites)))))
    stage_map = StageMap((), tuple(unmatched), tuple(sites), placements)
    return StageMap(stage_map.for_placement("6-site"), tuple(unmatched), tuple(sites), placements)


def _indices(found: Sequence[int | None]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(i for i in found if i is not None))


def _tail_conv(gm: fx.GraphModule, out: fx.Node) -> fx.Node | None:
    """The last conv on the way to the model output ``out``: the student's tail reads its input."""
    cur = out
    while cur is not None:
        if op_kind(gm, cur) == "conv" or up_kind(gm, cur) == "conv_transpose":
            return cur
        ins = [a for a in cur.all_input_nodes if spatial_size(a) is not None]
        cur = ins[0] if len(ins) == 1 else None
    return None


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
