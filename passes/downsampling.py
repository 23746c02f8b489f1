"""Downsampling analysis (docs/definitions.md §4): where a CNN's spatial size drops, and which drops are coupled.

Works on the captured graph with fake-tensor shapes, never on architecture names: torch.fx when the
model traces, else torch.export with symbolic sizes (:mod:`passes.graph_capture`).

- A **downsampling point** is a conv or a max/avg pool (module or functional) with stride > 1 whose
  output is spatially smaller than its input, or a space-to-depth rearrangement (a reshape that moves
  pixel blocks into channels, keeping every element; TResNet's stem), which the student keeps as it
  is. Global pools (adaptive pools, or a pool down to 1×1) are left alone, as is everything without a
  spatial layout (flatten, linear...).
- Nodes joined by a data edge of equal spatial size form a **region**. The points whose outputs lie in
  the same region are **coupled** — a residual's strided conv and its strided 1×1 (or pooling)
  shortcut meet at the add, the strided branches of a concat meet at the cat — and form one
  **level**: they change together. Levels are ordered by execution. A level's **exit** (the last node
  of its region) is the output of that stage: a feature point for the stage map.
- Spatial sizes come from :mod:`passes.layout`: a permuted (channels-last), grouped or reduced view
  of a map keeps its height and width, so layout ops are never mistaken for resampling.
- An **upsampling point** is a transposed conv or an interpolation (module, function or ATen op)
  whose output is larger than its input. Encoder-decoders (UNets) have them; every other op that
  enlarges a map by 2x or more is refused. Ops that change a size by less than 2x (a pad to a skip's
  odd size, a valid conv) keep their nodes in one region.
- The **stem** is the first conv, the pointwise chain after it (BN, activations) and the pools chained
  directly behind it. Its first downsampling point is the stem level (``None`` for a stride-1 stem);
  later pools of the chain are the stem pools (ResNet's maxpool).

How each kind of op takes a new stride is a table (:data:`KIND_RULES`), and how its geometry is read
and written depends only on how it is called (module attributes or function arguments).

Example:
    >>> import torch
    >>> from memplan.zoo import create_model
    >>> a = analyze_downsampling(create_model("resnet18"), torch.empty(1, 3, 224, 224))
    >>> [(lv.label, lv.stride, lv.out_size) for lv in a.levels]  # doctest: +NORMALIZE_WHITESPACE
    [('conv1', 2, (112, 112)), ('maxpool', 2, (56, 56)), ('layer2.0', 2, (28, 28)),
     ('layer3.0', 2, (14, 14)), ('layer4.0', 2, (7, 7))]
    >>> a.stem.level, a.stem.pools, a.stem.end
    (0, (1,), 'relu')
    >>> [p.target for p in a.levels[2].points]
    ['layer2.0.conv1', 'layer2.0.downsample.0']
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.operator_schemas import normalize_function

from memplan.analyze import report_from_graph
from memplan.capture import META_KEY, CapturedGraph
from memplan.errors import MemplanError, describe_error
from memplan.graph import build_graph
from passes.graph_capture import capture_rewritable
from passes.layout import layout_of, propagate_layout, spatial_size

__all__ = [
    "KIND_RULES", "UP_KINDS", "AbsorbError", "DownsamplingAnalysis", "Geometry", "KindRule", "Level", "PassError",
    "Point", "Stem", "UpPoint", "UpsamplingError", "analyze_downsampling", "deploy_peak", "normalized_kwargs", "op_kind",
    "read_geometry", "set_arguments", "up_kind", "write_geometry",
]

Size = tuple[int, int]
_CALLS = ("call_module", "call_function", "call_method")


class PassError(MemplanError):
    """A model the student passes cannot rewrite, or a request they cannot meet (one-line message)."""


class AbsorbError(PassError):
    """The factor cannot be removed from later downsampling points: the final map would shrink."""


class UpsamplingError(PassError):
    """A net that upsamples (decoder, multi-resolution fusion) whose joins the student cannot keep at one
    resolution: the message names the upsampling or joining node."""


# ------------------------------------------------------------------------------------------ op kinds
@dataclass(frozen=True)
class Geometry:
    """Square kernel and stride of a downsampling op (a conv's kernel is informative only)."""

    kernel: int
    stride: int


@dataclass(frozen=True)
class KindRule:
    """How one kind of downsampling op takes a new stride.

    A non-overlapping pool (``kernel == stride``) keeps ``kernel == stride``, so stride 1 means a 1×1
    pool and the spatial size is kept; an overlapping pool (ResNet's 3×3/2 maxpool with padding 1)
    keeps kernel and padding, which also keeps the size at stride 1. A conv keeps kernel and padding.
    A ``fixed`` kind keeps its factor: a space-to-depth rearrangement (a reshape that moves each
    ``s×s`` block of pixels into channels, ``pixel_unshuffle``) has no stride to change, so the
    student leaves it as it is and absorbs the factor elsewhere.

    >>> KIND_RULES["max_pool"].restride(Geometry(2, 2), 8), KIND_RULES["conv"].restride(Geometry(7, 2), 8)
    (Geometry(kernel=8, stride=8), Geometry(kernel=7, stride=8))
    """

    kernel_follows_stride: bool
    fixed: bool = False

    def restride(self, g: Geometry, stride: int) -> Geometry:
        """The geometry with the new stride."""
        if self.kernel_follows_stride and g.kernel == g.stride:
            return Geometry(stride, stride)
        return Geometry(g.kernel, stride)

    def can_grow(self, g: Geometry) -> bool:
        """Whether the op can carry a larger stride itself (else a pool is inserted after it)."""
        return not self.fixed and (not self.kernel_follows_stride or g.kernel == g.stride)


KIND_RULES: dict[str, KindRule] = {
    "conv": KindRule(kernel_follows_stride=False),
    "max_pool": KindRule(kernel_follows_stride=True),
    "avg_pool": KindRule(kernel_follows_stride=True),
    "space_to_depth": KindRule(kernel_follows_stride=True, fixed=True),
}
_MODULE_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Conv2d, "conv"), (nn.MaxPool2d, "max_pool"), (nn.AvgPool2d, "avg_pool"),
)
_ATEN = torch.ops.aten
_FUNCTION_KINDS = {
    F.conv2d: "conv", F.max_pool2d: "max_pool", torch.max_pool2d: "max_pool", F.avg_pool2d: "avg_pool",
    _ATEN.conv2d.default: "conv", _ATEN.conv2d.padding: "conv", _ATEN.max_pool2d.default: "max_pool",
    _ATEN.max_pool2d_with_indices.default: "max_pool", _ATEN.avg_pool2d.default: "avg_pool",
}
UP_KINDS = ("conv_transpose", "interpolate")
_UP_MODULE_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.ConvTranspose2d, "conv_transpose"), (nn.Upsample, "interpolate"),
)
_UP_FUNCTION_KINDS = {
    F.conv_transpose2d: "conv_transpose", _ATEN.conv_transpose2d.input: "conv_transpose",
    F.interpolate: "interpolate", _ATEN.upsample_nearest2d.vec: "interpolate",
    _ATEN.upsample_bilinear2d.vec: "interpolate", _ATEN.upsample_bicubic2d.vec: "interpolate",
}


def _square(value: int | Sequence[int], node: fx.Node, what: str) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise PassError(f"node '{node.name}' has a non-square {what} {tuple(value)}; only square ones are supported")
    return int(value[0])


def _like(old: int | Sequence[int], new: int) -> int | tuple[int, ...]:
    return new if isinstance(old, int) else (new,) * len(old)


class _ModuleAccess:
    """Geometry held in a module's ``kernel_size`` and ``stride`` attributes."""

    @staticmethod
    def read(gm: fx.GraphModule, node: fx.Node) -> Geometry:
        m = gm.get_submodule(str(node.target))
        return Geometry(_square(m.kernel_size, node, "kernel"), _square(m.stride, node, "stride"))

    @staticmethod
    def write(gm: fx.GraphModule, node: fx.Node, g: Geometry) -> None:
        m = gm.get_submodule(str(node.target))
        m.kernel_size = _like(m.kernel_size, g.kernel)
        m.stride = _like(m.stride, g.stride)
        if getattr(m, "padding", None) == "same" and g.stride > 1:  # torch refuses "same" with a stride
            m.padding = _like(m.stride, _same_padding(g.kernel, m.dilation, node))


class _FunctionAccess:
    """Geometry passed as arguments of ``F.conv2d`` / ``F.max_pool2d`` / ``F.avg_pool2d``."""

    @staticmethod
    def _kwargs(node: fx.Node) -> dict:
        return normalized_kwargs(node)

    @classmethod
    def read(cls, gm: fx.GraphModule, node: fx.Node) -> Geometry:
        kw = cls._kwargs(node)
        if "kernel_size" in kw:
            kernel = _square(kw["kernel_size"], node, "kernel")
        elif isinstance(kw["weight"], fx.Node) and kw["weight"].op == "get_attr":
            kernel = int(getattr_path(gm, str(kw["weight"].target)).shape[-1])
        elif isinstance(kw["weight"], fx.Node) and META_KEY in kw["weight"].meta:  # a standardised weight
            kernel = _square(kw["weight"].meta[META_KEY].outputs[0].shape[2:], node, "kernel")
        else:
            raise PassError(f"node '{node.name}' convolves with a computed weight; cannot read its kernel")
        stride = kw.get("stride")
        return Geometry(kernel, kernel if stride in (None, [], ()) else _square(stride, node, "stride"))

    @classmethod
    def write(cls, gm: fx.GraphModule, node: fx.Node, g: Geometry) -> None:
        kw = cls._kwargs(node)
        listed = isinstance(node.target, torch._ops.OpOverload)  # ATen schemas take int lists
        kw["stride"] = [g.stride] * 2 if listed else g.stride
        if "kernel_size" in kw:
            kw["kernel_size"] = [g.kernel] * 2 if listed else g.kernel
        elif kw.get("padding") == "same" and g.stride > 1:  # torch refuses "same" with a stride
            kw["padding"] = _same_padding(g.kernel, kw.get("dilation", 1), node)
            if isinstance(node.target, torch._ops.OpOverload):
                node.target = _ATEN.conv2d.default
        set_arguments(node, kw)


def _same_padding(kernel: int, dilation: int | Sequence[int], node: fx.Node) -> int:
    if kernel % 2 == 0:
        raise PassError(f"node '{node.name}' pads 'same' with an even kernel {kernel}; it cannot take a stride")
    return (kernel - 1) // 2 * _square(dilation, node, "dilation")


def set_arguments(node: fx.Node, kw: dict) -> None:
    """Give a function node the arguments ``kw`` (as :func:`normalized_kwargs` names them). ATen ops
    take them positionally in schema order (torch.fx names their ``self`` argument ``input``)."""
    if not isinstance(node.target, torch._ops.OpOverload):
        node.args, node.kwargs = (), kw
        return
    args, kwargs = [], {}
    for a in node.target._schema.arguments:
        name = "input" if a.name == "self" else a.name
        if name not in kw:
            continue
        if a.kwarg_only:
            kwargs[a.name] = kw[name]
        else:
            args.append(kw[name])
    node.args, node.kwargs = tuple(args), kwargs


def normalized_kwargs(node: fx.Node) -> dict:
    """The arguments of a function node by name; overloads that only the argument types tell apart
    (``conv2d`` with ``padding="same"``) are resolved from the values' types. One-line :class:`PassError`."""
    def kind(v: object) -> object:
        if isinstance(v, fx.Node):
            return torch.Tensor
        if isinstance(v, (tuple, list)) and v and all(isinstance(x, int) for x in v):
            return list[int]  # a stride tuple matches the schema's int[], not only a str overload
        return type(v)

    for types in (None, (tuple(kind(a) for a in node.args), {k: kind(v) for k, v in node.kwargs.items()})):
        try:
            pair = normalize_function(node.target, node.args, node.kwargs, *(types or ()),
                                      normalize_to_only_use_kwargs=True)
        except Exception:  # noqa: BLE001 - an ambiguous schema match raises; try with types
            pair = None
        if pair is not None:
            return dict(pair.kwargs)
    raise PassError(f"cannot read the arguments of node '{node.name}' ({getattr(node.target, '__name__', node.target)})")


_ACCESS = {"call_module": _ModuleAccess, "call_function": _FunctionAccess}


def getattr_path(root: nn.Module, path: str) -> object:
    """``root.a.b.c`` for ``path = "a.b.c"``."""
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def op_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The :data:`KIND_RULES` key of a node that can downsample (conv, max_pool, avg_pool), else None."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        return next((k for t, k in _MODULE_KINDS if isinstance(m, t)), None)
    if node.op == "call_function":
        return _FUNCTION_KINDS.get(node.target)
    return None


def up_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """``"conv_transpose"`` or ``"interpolate"`` for a node that can upsample, else None."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        return next((k for t, k in _UP_MODULE_KINDS if isinstance(m, t)), None)
    if node.op == "call_function":
        return _UP_FUNCTION_KINDS.get(node.target)
    return None


def read_geometry(gm: fx.GraphModule, node: fx.Node) -> Geometry:
    """Kernel and stride of a node whose :func:`op_kind` is not None."""
    return _ACCESS[node.op].read(gm, node)


def write_geometry(gm: fx.GraphModule, node: fx.Node, g: Geometry) -> None:
    """Set kernel and stride of a node whose :func:`op_kind` is not None."""
    _ACCESS[node.op].write(gm, node, g)


# ------------------------------------------------------------------------------------------ analysis
@dataclass(frozen=True)
class Point:
    """One downsampling op of the teacher."""

    node: str  # fx node name
    target: str  # module path, or function name
    kind: str  # key of KIND_RULES
    geometry: Geometry
    input: str  # node whose output it reads
    in_size: Size
    out_size: Size

    @property
    def stride(self) -> int:
        return self.geometry.stride


@dataclass(frozen=True)
class UpPoint:
    """One upsampling op of the teacher (a transposed conv or an interpolation)."""

    node: str
    target: str
    kind: str  # "conv_transpose" or "interpolate"
    factor: Fraction  # teacher's upsampling factor per side (stride, scale, or output/input size)
    input: str
    in_size: Size
    out_size: Size
    follows: bool  # the output size is read from another tensor at run time (``size=skip.shape[2:]``)


@dataclass(frozen=True)
class Level:
    """Coupled downsampling points: they produce the same region and change together."""

    index: int
    label: str  # common module path of the points
    points: tuple[Point, ...]
    out_size: Size
    exit: str  # last node (execution order) of the region the level produces: the stage output

    @property
    def stride(self) -> int:
        return max(p.stride for p in self.points)


@dataclass(frozen=True)
class Stem:
    """The first conv and what hangs directly off it (see the module docstring)."""

    conv: str  # node of the first conv
    level: int | None  # index of the stem's downsampling level; None for a stride-1 stem
    pools: tuple[int, ...]  # pool levels chained directly after the stem level
    end: str  # last node of the pointwise chain after the stem level (or the stem conv): a pool goes here


@dataclass
class DownsamplingAnalysis:
    """Downsampling levels, stem, and per-node spatial sizes of a traced teacher."""

    model: str
    input_shape: tuple[int, ...]
    levels: tuple[Level, ...]
    stem: Stem
    input_exit: str  # last node of the input region (before the first level)
    sizes: dict[str, Size]  # spatial size of every node whose output is a spatial map (passes.layout)
    channels: dict[str, int]  # channels of every (N, C, H, W) map
    modules: dict[str, str]  # node name -> module path that ran it
    order: dict[str, int]  # node name -> execution index
    output_shapes: tuple[tuple[int, ...], ...]
    taken_names: frozenset[str]  # attribute names of the model (an inserted pool must avoid them)
    captured: CapturedGraph = field(repr=False)
    dag: nx.DiGraph = field(repr=False)
    ups: tuple[UpPoint, ...] = ()  # upsampling points in execution order (encoder-decoders)
    region: dict[str, int] = field(default_factory=dict)  # node -> region (connected equal-resolution part)
    globals: frozenset[str] = frozenset()  # nodes whose maps do not follow the input resolution (global pools)
    static_sizes: bool = False  # an exported graph whose size-dependent numbers are constants (graph_capture)

    @property
    def method(self) -> str:
        """How the graph was captured: ``"fx"`` or ``"export"``."""
        return self.captured.method

    @property
    def encoder_decoder(self) -> bool:
        """Whether the network upsamples again (skip-connected encoder-decoder, FPN...)."""
        return bool(self.ups)

    @property
    def peak_bytes(self) -> int:
        """Deploy-form peak activation memory of the teacher at the analysed input."""
        return deploy_peak(self.captured)

    def descendants(self, names: Iterable[str]) -> set[str]:
        """``names`` and every node computed from them."""
        out = set(names)
        for n in list(out):
            out |= nx.descendants(self.dag, n)
        return out

    @property
    def feature_points(self) -> list[str]:
        """Stage outputs in execution order: the exits of the input region and of every level."""
        names = {self.input_exit, *(lv.exit for lv in self.levels)}
        return sorted((n for n in names if self.dag.nodes[n].get("op") != "placeholder" and n in self.channels),
                      key=self.order.__getitem__)


def deploy_peak(captured: CapturedGraph) -> int:
    """Deploy-form peak (docs/definitions.md §1) of a captured model: what ``memplan.analyze`` reports."""
    return report_from_graph(build_graph(captured, form="deploy")).peak_bytes


def _size(node: fx.Node) -> Size | None:
    return spatial_size(node)


def _is_global(gm: fx.GraphModule, node: fx.Node, out: Size) -> bool:
    """Adaptive pools and reductions to 1×1: their output does not follow the input resolution."""
    if out == (1, 1):
        return True
    name = type(gm.get_submodule(str(node.target))).__name__ if node.op == "call_module" else str(node.target)
    return "adaptive" in name.lower()


def _up_factor(gm: fx.GraphModule, node: fx.Node, kind: str, src: Size, out: Size) -> tuple[Fraction, bool]:
    """The teacher's upsampling factor of an up point, and whether its output size follows a tensor."""
    if kind == "conv_transpose":
        if node.op == "call_module":
            return Fraction(_square(gm.get_submodule(str(node.target)).stride, node, "stride")), False
        return Fraction(_square(normalized_kwargs(node).get("stride", 1), node, "stride")), False
    if node.op == "call_module":
        return Fraction(out[0], src[0]), False
    kw = normalized_kwargs(node)
    size = kw.get("size", kw.get("output_size"))
    follows = size is not None and any(isinstance(v, fx.Node) for v in torch.utils._pytree.tree_leaves(size))
    return Fraction(out[0], src[0]), follows


def _label(targets: Sequence[str], fallback: str) -> str:
    parts = os.path.commonprefix([t.split(".") for t in targets])
    return ".".join(parts) or fallback


def analyze_downsampling(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], symbolic: bool = False
) -> DownsamplingAnalysis:
    """Trace ``model`` with torch.fx and find its downsampling levels, coupling and stem.

    ``example_inputs`` may be meta tensors (only shapes are used). Raises :class:`PassError` for a
    model that is not fx-traceable, has no conv, upsamples (UNet decoders), or downsamples with an op
    that cannot be re-strided (strided slicing, pixel-unshuffle).
    """
    inputs = [example_inputs] if isinstance(example_inputs, torch.Tensor) else list(example_inputs)
    was_training = model.training
    model.eval()
    try:
        captured = capture_rewritable(model, inputs, symbolic)
    except MemplanError as e:
        raise PassError(f"aggressive pooling cannot capture the model: {e}") from e
    except Exception as e:  # noqa: BLE001 - shape propagation of a user model can fail in any way
        raise PassError(f"aggressive pooling cannot run {type(model).__name__} on fake tensors: {describe_error(e)}") from e
    finally:
        model.train(was_training)
    gm = captured.gm
    propagate_layout(gm)
    nodes = [n for n in gm.graph.nodes if n.op != "get_attr"]
    sizes = {n.name: s for n in nodes if n.op != "output" and (s := _size(n)) is not None}
    if not any(n.op == "placeholder" and n.name in sizes for n in nodes):
        raise PassError(f"{type(model).__name__} takes no 4-d (N, C, H, W) input; aggressive pooling needs an image model")
    points, ups, regions, global_nodes = _points_and_regions(gm, nodes, sizes)
    component = {name: i for i, comp in enumerate(nx.connected_components(regions)) for name in comp}
    members: dict[int, list[str]] = {}
    for name, c in component.items():
        members.setdefault(c, []).append(name)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    dag = nx.DiGraph()
    for n in gm.graph.nodes:
        dag.add_node(n.name, op=n.op)
        dag.add_edges_from((a.name, n.name) for a in n.all_input_nodes)
    exit_of = _exit_rule(gm, nodes, dag, order)
    grouped: dict[int, list[Point]] = {}
    for p in points:
        grouped.setdefault(component[p.node], []).append(p)
    levels = tuple(
        Level(i, _label([p.target for p in pts], pts[0].node), tuple(pts), pts[0].out_size, exit_of(members[c]))
        for i, (c, pts) in enumerate(sorted(grouped.items(), key=lambda kv: order[kv[1][0].node]))
    )
    placeholder = next(n.name for n in nodes if n.op == "placeholder" and n.name in sizes)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return DownsamplingAnalysis(
        model=type(model).__name__,
        input_shape=tuple(inputs[0].shape),
        levels=levels,
        stem=_stem(gm, nodes, sizes, levels),
        input_exit=exit_of(members[component[placeholder]]),
        sizes=sizes,
        channels={n.name: n.meta[META_KEY].outputs[0].shape[1] for n in nodes
                  if n.name in sizes and (lay := layout_of(n)) is not None and lay.nchw},
        modules={n.name: n.meta[META_KEY].module for n in nodes if META_KEY in n.meta},
        order=order,
        output_shapes=tuple(t.shape for t in output.meta[META_KEY].outputs),
        taken_names=frozenset(dir(model)),
        captured=captured,
        dag=dag,
        ups=tuple(ups),
        region=component,
        globals=frozenset(global_nodes),
        static_sizes=captured.method == "export" and not symbolic,
    )


def _points_and_regions(
    gm: fx.GraphModule, nodes: list[fx.Node], sizes: dict[str, Size]
) -> tuple[list[Point], list[UpPoint], nx.Graph, set[str]]:
    """Down- and upsampling points, the graph whose connected components are the regions, and the
    nodes whose maps do not follow the input resolution (global pools and what is computed from them)."""
    points: list[Point] = []
    ups: list[UpPoint] = []
    regions = nx.Graph()
    regions.add_nodes_from(sizes)
    global_nodes: set[str] = set()
    for n in nodes:
        if n.op not in _CALLS or n.name not in sizes:
            continue
        ins = [a for a in n.all_input_nodes if a.name in sizes and a.name not in global_nodes]
        if not ins:
            if any(a.name in global_nodes for a in n.all_input_nodes):
                global_nodes.add(n.name)
            continue
        out, src = sizes[n.name], max((sizes[a.name] for a in ins), key=lambda s: s[0] * s[1])
        kind, up = op_kind(gm, n), up_kind(gm, n)
        shrinks = out[0] < src[0] or out[1] < src[1]
        grows = out[0] > src[0] or out[1] > src[1]
        target = str(n.target) if n.op == "call_module" else (n.meta[META_KEY].module or n.name)
        if kind is not None and shrinks and not (kind != "conv" and out == (1, 1)):
            g = read_geometry(gm, n)
            if g.stride > 1:
                points.append(Point(n.name, target, kind, g, ins[0].name, sizes[ins[0].name], out))
                continue
        if up is not None and grows:
            factor, follows = _up_factor(gm, n, up, sizes[ins[0].name], out)
            if factor > 1 or follows:
                ups.append(UpPoint(n.name, target, up, factor, ins[0].name, sizes[ins[0].name], out, follows))
                continue
        if kind is None and up is None and _is_global(gm, n, out):
            global_nodes.add(n.name)
            continue
        if kind is None and up is None and (f := _space_to_depth(n, ins[0], src, out)):
            points.append(Point(n.name, target, "space_to_depth", Geometry(f, f), ins[0].name, src, out))
            continue
        if kind is None:
            what = f"'{n.name}' ({type(gm.get_submodule(str(n.target))).__name__ if n.op == 'call_module' else n.target})"
            if out[0] >= 2 * src[0] or out[1] >= 2 * src[1]:
                raise PassError(
                    f"node {what} upsamples {src[0]}x{src[1]} -> {out[0]}x{out[1]} but is not a transposed conv "
                    "or an interpolation; aggressive pooling cannot re-scale it"
                )
            if 2 * out[0] <= src[0] or 2 * out[1] <= src[1]:
                raise PassError(
                    f"node {what} downsamples {src[0]}x{src[1]} -> {out[0]}x{out[1]} but is not a conv, "
                    "max-pool or avg-pool; aggressive pooling cannot re-stride it"
                )
        # equal sizes, or a size adjusted by less than 2x (a pad to an odd skip size): one region
        regions.add_edges_from((a.name, n.name) for a in ins
                               if 2 * sizes[a.name][0] > out[0] and 2 * out[0] > sizes[a.name][0]
                               and 2 * sizes[a.name][1] > out[1] and 2 * out[1] > sizes[a.name][1])
    return points, ups, regions, global_nodes


def _space_to_depth(node: fx.Node, src_node: fx.Node, src: Size, out: Size) -> int | None:
    """The factor of a rearrangement that shrinks a map by an integer factor per side while keeping every
    element (a reshape splitting off ``s×s`` pixel blocks, ``pixel_unshuffle``), else None."""
    f = src[0] // out[0]
    if f < 2 or src != (out[0] * f, out[1] * f):
        return None
    numel = [math.prod(m.outputs[0].shape) for m in (node.meta[META_KEY], src_node.meta[META_KEY])]
    return f if numel[0] == numel[1] else None


def _exit_rule(
    gm: fx.GraphModule, nodes: list[fx.Node], dag: nx.DiGraph, order: dict[str, int]
) -> Callable[[Iterable[str]], str]:
    """The stage output of a region: of its nodes that every path to the model output passes through
    (dominators), the one closing the shallowest module call (``layer1`` rather than ``layer2.0.relu``;
    a top-level op counts as depth 0), the latest on ties; the latest node when none dominates."""
    closes: dict[str, str] = {}
    for n in nodes:
        path = n.meta[META_KEY].module if META_KEY in n.meta else ""
        parts = path.split(".") if path else []
        for i in range(1, len(parts) + 1):
            closes[".".join(parts[:i])] = n.name
    depth = {n.name: 0 for n in nodes if n.op in _CALLS and not n.meta[META_KEY].module}
    for prefix, name in closes.items():
        depth[name] = min(depth.get(name, prefix.count(".") + 1), prefix.count(".") + 1)
    root = "__memplan_root__"
    rooted = dag.copy()
    rooted.add_edges_from((root, n.name) for n in nodes if n.op == "placeholder")
    idom = nx.immediate_dominators(rooted, root)
    dominators, cur = set(), next(n.name for n in gm.graph.nodes if n.op == "output")
    while cur != root:
        cur = idom[cur]
        dominators.add(cur)

    def exit_of(members: Iterable[str]) -> str:
        members = list(members)
        dominating = [m for m in members if m in dominators]
        if not dominating:
            return max(members, key=order.__getitem__)
        return min(dominating, key=lambda m: (depth.get(m, len(order)), -order[m]))

    return exit_of


def _pointwise(gm: fx.GraphModule, node: fx.Node, prev: fx.Node) -> bool:
    """A shape-keeping op of one tensor (BN, activation, identity, dropout, scaling)."""
    return (
        node.op in _CALLS
        and node.all_input_nodes == [prev]
        and op_kind(gm, node) is None
        and _size(node) is not None
        and node.meta[META_KEY].outputs[0].shape == prev.meta[META_KEY].outputs[0].shape
    )


def _stem(gm: fx.GraphModule, nodes: list[fx.Node], sizes: dict[str, Size], levels: tuple[Level, ...]) -> Stem:
    level_of = {p.node: lv.index for lv in levels for p in lv.points}
    conv = next((n for n in nodes if n.name in sizes and op_kind(gm, n) == "conv"), None)
    if conv is None:
        raise PassError("the model has no convolution; aggressive pooling needs a CNN")
    stem_level, pools, end, cur = level_of.get(conv.name), [], conv.name, conv
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        if nxt.name in level_of and op_kind(gm, nxt) not in (None, "conv"):
            if stem_level is None:
                stem_level, end = level_of[nxt.name], nxt.name
            else:
                pools.append(level_of[nxt.name])
        elif _pointwise(gm, nxt, cur):
            end = end if pools else nxt.name
        else:
            break
        cur = nxt
    return Stem(conv.name, stem_level, tuple(pools), end)
