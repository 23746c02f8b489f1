"""Patch-based execution (MCUNetV2-style): run a CNN's memory-heavy early part patch by patch, exactly.

The pass splits the traced graph (:func:`memplan.capture.capture`) at a node ``S``: the *prefix*
(every op before ``S`` in program order, ``S`` included) runs once per tile of a grid over ``S``'s
feature map; each run reads the input region that tile's receptive field needs (its *halo*),
computed backwards through the prefix from the traced convs' and pools' kernels, strides,
dilations and paddings. The tiles are copied into one pre-allocated map of ``S``'s full size and
the rest of the graph (the *suffix*) runs on it unchanged. Borders are exact: a tile on the image
border gets the op's real zero (or, for max pools, ``-inf``) padding through an explicit pad, an
interior tile reads its neighbours' real pixels, and every windowed op then runs with padding 0.

How each op kind maps an output region to the input region it reads, and how it is re-emitted for
one patch, is a handler table (:data:`HANDLERS`: windowed convs and pools, pointwise ops, channel
concats and channel slices). Queries that feed no tensor (``x.ndim == 4`` checks) are ignored. Ops
without a handler (global pools, linear layers, attention, reshapes) are not spatially
local: the first one bounds how far the split can go. A split must be a cut: nothing computed
before ``S`` but ``S`` is read after it.

The patched model is an ordinary ``fx.GraphModule`` sharing the original's parameter names (its
``state_dict`` loads into the original and back), differentiable, exportable to ONNX. Its program
order runs patch after patch, so each patch's tensors die before the next patch starts: its
deploy-form peak (docs/definitions.md §1-§2) counts one patch's working set plus the assembled map,
and the input image while any patch still reads it. With ``stream_input`` each patch copies its
input crop first and the input itself is not counted (a camera delivering rows,
docs/definitions.md §1's lifetime rule applied to the crops only); when only windows that do not
overlap read the input (a patchify stem, stride >= kernel), a cached band copies the input rows of
one output row at a time instead of its whole crop.

Halos are recomputed by every patch (MCUNetV2; any grid, more MACs) or, with ``halo="cache"``,
cached: full-width row bands run top to bottom, every node computes only the rows no earlier band
computed and keeps a clone of the rows a later band reads again (a line buffer), so every row is
computed once. Bands are paced by the split map (each delivers a tile of its rows; the first spans
the receptive field of its first row) or by the input (each makes a tile of input rows available and
every node computes what it then can: a line-buffer pipeline). ``halo="mixed"`` keeps no rows of
row-local ops that are wider than their inputs (an inverted residual's expansion) and recomputes
them from the narrower kept rows instead.

The split point and grid are chosen by a fast estimate (the unpatched graph's liveness with every
tensor scaled to its per-patch region) and confirmed on the best few by analysing the real patched
graph; the result reports the compute overhead of the halos (conv/linear MACs, patched/unpatched).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
    ...                           torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
    ...                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    >>> r = patch_model(net, torch.empty(1, 3, 16, 16), grid=2, verify=1)
    >>> r.plan.split_node, r.plan.grid, r.peak_bytes, r.patched_peak_bytes, r.max_abs_diff < 1e-5
    ('_3', (2, 2), 11264, 8512, True)
    >>> c = patch_model(net, torch.empty(1, 3, 16, 16), grid=(4, 1), halo="cache", verify=1)
    >>> c.plan.halo, c.patched_peak_bytes, round(r.mac_overhead, 3), round(c.mac_overhead, 3)
    ('cache', 10240, 1.246, 1.037)
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from memplan.analyze import MemoryReport, report_from_graph
from memplan.capture import META_KEY, CapturedGraph, capture, target_name
from memplan.errors import MemplanError
from memplan.graph import build_graph
from memplan.graph import op_kind as memplan_op_kind
from memplan.liveness import Lifetime, live_bytes

__all__ = [
    "HALOS", "HANDLERS", "TARGETS", "Handler", "PatchError", "PatchPlan", "PatchResult", "Window", "apply_plan", "count_macs",
    "local_ops", "measure_patched", "patch_model", "receptive_field",
]

TARGETS = ("torch", "onnx")
HALOS = ("auto", "recompute", "cache", "mixed")
PACES = ("split", "input")  # what drives cached row bands: rows of the split map, or of the input
Range = tuple[int, int]  # [lo, hi) along one spatial axis
_CALLS = ("call_module", "call_function", "call_method")


class PatchError(MemplanError):
    """A model whose early part cannot be patched, or a request no grid meets (one-line message)."""


# ------------------------------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class Window:
    """A sliding window along one axis: output ``o`` reads inputs ``o*stride - pad + dilation*[0, kernel)``."""

    kernel: int = 1
    stride: int = 1
    dilation: int = 1
    pad: int = 0  # leading padding (the trailing one only decides the output size)

    def input_range(self, out: Range) -> Range:
        """The (unclipped) input range the outputs ``out`` read.

        >>> Window(3, 2, 1, 1).input_range((0, 4)), Window(3, 1, 2, 2).input_range((5, 6))
        ((-1, 8), (3, 8))
        """
        lo, hi = out
        return lo * self.stride - self.pad, (hi - 1) * self.stride - self.pad + self.dilation * (self.kernel - 1) + 1


def receptive_field(windows: Sequence[Window]) -> tuple[int, int]:
    """Receptive field and total stride of a chain of windows (first applied first).

    >>> receptive_field([Window(3, 1), Window(3, 2), Window(3, 1, dilation=2)])
    (13, 2)
    """
    lo, hi = 0, 1
    for w in reversed(windows):
        lo, hi = w.input_range((lo, hi))
    return hi - lo, math.prod(w.stride for w in windows)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


# ------------------------------------------------------------------------------------------ handlers
@dataclass(frozen=True)
class LocalOp:
    """A prefix op a handler accepted: its kind and, for windowed ops, the per-axis windows and call."""

    kind: str
    windows: tuple[Window, Window] = (Window(), Window())
    pad_value: float = 0.0
    call: Callable[..., Any] | None = None  # the functional op run with padding 0: call(x, **kwargs)
    kwargs: dict[str, Any] = field(default_factory=dict)  # values may be fx nodes of the original graph


@dataclass(frozen=True)
class Handler:
    """Reads a node of one op kind into a :class:`LocalOp`, or returns a reason it is not local."""

    read: Callable[[fx.GraphModule, fx.Node], LocalOp | str]


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_MAX_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_SIGNATURES: dict[Any, tuple[str, ...]] = {
    F.conv2d: _CONV_ARGS, torch.conv2d: _CONV_ARGS, F.max_pool2d: _MAX_POOL_ARGS, torch.max_pool2d: _MAX_POOL_ARGS,
    F.avg_pool2d: _AVG_POOL_ARGS, torch.cat: ("tensors", "dim"), torch.concat: ("tensors", "dim"),
    F.linear: ("input", "weight", "bias"),
}


def _normalized(gm: fx.GraphModule, n: fx.Node) -> dict[str, Any]:
    """A call_function node's arguments by name (schema of an ATen overload, or the table above)."""
    if isinstance(n.target, torch._ops.OpOverload):
        names = tuple(a.name for a in n.target._schema.arguments)
    elif n.target in _SIGNATURES:
        names = _SIGNATURES[n.target]
    else:
        pair = n.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
        if pair is None:
            raise PatchError(f"cannot read the arguments of node '{n.name}' ({target_name(n, gm)})")
        return dict(pair.kwargs)
    if n.target in (torch.ops.aten.cat.default,):
        names = ("tensors", "dim")
    return {**dict(zip(names, n.args)), **n.kwargs}


def _windows(kernel: Any, stride: Any, dilation: Any, padding: Any) -> tuple[Window, Window]:
    k, s, d, p = _pair(kernel), _pair(stride if stride not in (None, [], ()) else kernel), _pair(dilation), padding
    if isinstance(p, str):  # "valid" / "same" (stride 1): total padding d*(k-1), leading half of it
        p = (0, 0) if p == "valid" else tuple(d[i] * (k[i] - 1) // 2 for i in range(2))
    p = _pair(p)
    return tuple(Window(k[i], s[i], d[i], p[i]) for i in range(2))  # type: ignore[return-value]


def _read_conv(gm: fx.GraphModule, n: fx.Node) -> LocalOp | str:
    if n.op == "call_module":
        m = gm.get_submodule(str(n.target))
        if not isinstance(m, nn.Conv2d):
            return f"{type(m).__name__} is not a 2-d convolution"
        if m.padding_mode != "zeros":
            return f"padding_mode '{m.padding_mode}' is not zero padding"
        kw = {"weight": _Attr(f"{n.target}.weight"), "bias": _Attr(f"{n.target}.bias") if m.bias is not None else None,
              "stride": m.stride, "dilation": m.dilation, "groups": m.groups}
        return LocalOp("conv", _windows(m.kernel_size, m.stride, m.dilation, m.padding), 0.0, F.conv2d, kw)
    kw = _normalized(gm, n)
    if kw.get("transposed") or len(_shape(kw["input"])) != 4:
        return "transposed or non-2-d convolution"
    weight = kw["weight"]
    if not all(_param_side_node(v) for v in (weight, kw.get("bias")) if isinstance(v, fx.Node)):
        return "convolves with weights computed from the input"
    kernel = _shape(weight)[-2:]
    out = {"weight": weight, "bias": kw.get("bias"), "stride": _pair(kw.get("stride", 1)),
           "dilation": _pair(kw.get("dilation", 1)), "groups": int(kw.get("groups", 1))}
    return LocalOp("conv", _windows(kernel, out["stride"], out["dilation"], kw.get("padding", 0)), 0.0,
                   F.conv2d, out)


def _read_max_pool(gm: fx.GraphModule, n: fx.Node) -> LocalOp | str:
    if n.op == "call_module":
        m = gm.get_submodule(str(n.target))
        kw = {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding, "dilation": m.dilation,
              "return_indices": m.return_indices}
    else:
        kw = _normalized(gm, n)
    if kw.get("return_indices"):
        return "max pool returning indices"
    w = _windows(kw["kernel_size"], kw.get("stride"), kw.get("dilation", 1), kw.get("padding", 0))
    call = {"kernel_size": _pair(kw["kernel_size"]), "stride": (w[0].stride, w[1].stride),
            "dilation": (w[0].dilation, w[1].dilation)}
    # ceil mode's extra window ends past the padding: -inf there is what max pooling ignores anyway
    return LocalOp("max_pool", w, float("-inf"), F.max_pool2d, call)


def _read_avg_pool(gm: fx.GraphModule, n: fx.Node) -> LocalOp | str:
    if n.op == "call_module":
        m = gm.get_submodule(str(n.target))
        kw = {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding, "ceil_mode": m.ceil_mode,
              "count_include_pad": m.count_include_pad, "divisor_override": m.divisor_override}
    else:
        kw = _normalized(gm, n)
    w = _windows(kw["kernel_size"], kw.get("stride"), 1, kw.get("padding", 0))
    padded = w[0].pad or w[1].pad
    if padded and not kw.get("count_include_pad", True):
        return "average pool that excludes its padding from the divisor"
    if kw.get("ceil_mode") and _floor_size(n, w) != tuple(_shape(n)[-2:]):
        return "average pool whose ceil mode adds partial windows"
    call = {"kernel_size": _pair(kw["kernel_size"]), "stride": (w[0].stride, w[1].stride),
            "divisor_override": kw.get("divisor_override")}
    return LocalOp("avg_pool", w, 0.0, F.avg_pool2d, call)


def _floor_size(n: fx.Node, w: tuple[Window, Window]) -> tuple[int, ...]:
    src = n.all_input_nodes[0] if n.all_input_nodes else n
    size = _shape(src)[-2:]
    return tuple((size[i] + 2 * w[i].pad - w[i].dilation * (w[i].kernel - 1) - 1) // w[i].stride + 1 for i in range(2))


def _read_pointwise(gm: fx.GraphModule, n: fx.Node) -> LocalOp | str:
    out = _shape(n)
    for a in n.all_input_nodes:
        s = _shape(a) if _is_tensor(a) else ()
        if len(s) == 4 and s[-2:] not in ((1, 1), out[-2:]) and not _param_side_node(a):
            return f"broadcasts a {s[-2]}x{s[-1]} map over {out[-2]}x{out[-1]}"
    return LocalOp("pointwise")


def _read_concat(gm: fx.GraphModule, n: fx.Node) -> LocalOp | str:
    kw = _normalized(gm, n)
    dim = int(kw.get("dim", 0))
    if dim not in (1, -3):
        return f"concatenates along dim {dim}, not channels"
    return LocalOp("pointwise")


def _read_channel_slice(gm: fx.GraphModule, n: fx.Node) -> LocalOp | str:
    """``x[:, a:b]`` (a channel range; batch, rows and columns whole): the same rows and columns out."""
    index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    full = slice(None, None, None)
    if Ellipsis in index[:-1] or any(not isinstance(i, slice) for i in index if i is not Ellipsis):
        return "indexes with more than slices"
    if (index[:1] and index[0] != full) or any(i != full for i in index[2:] if i is not Ellipsis):
        return "slices the batch or the spatial axes"
    return LocalOp("pointwise")


HANDLERS: dict[str, Handler] = {
    "conv": Handler(_read_conv),
    "max_pool": Handler(_read_max_pool),
    "avg_pool": Handler(_read_avg_pool),
    "pointwise": Handler(_read_pointwise),
    "concat": Handler(_read_concat),
    "channel_slice": Handler(_read_channel_slice),
}
_MODULE_KINDS: tuple[tuple[type[nn.Module] | tuple[type[nn.Module], ...], str], ...] = (
    (nn.Conv2d, "conv"), (nn.MaxPool2d, "max_pool"), (nn.AvgPool2d, "avg_pool"),
    ((nn.Identity, nn.Dropout, nn.Dropout2d), "pointwise"),
)
_FUNCTION_KINDS: dict[Any, str] = {
    F.conv2d: "conv", torch.conv2d: "conv", torch.ops.aten.conv2d.default: "conv",
    torch.ops.aten.convolution.default: "conv",
    F.max_pool2d: "max_pool", torch.max_pool2d: "max_pool", torch.ops.aten.max_pool2d.default: "max_pool",
    F.avg_pool2d: "avg_pool", torch.ops.aten.avg_pool2d.default: "avg_pool",
    torch.cat: "concat", torch.concat: "concat", torch.ops.aten.cat.default: "concat",
    F.dropout: "pointwise", torch.ops.aten.dropout.default: "pointwise", torch.ops.aten.clone.default: "pointwise",
}
_POINTWISE_KINDS = ("bn", "act", "eltwise")  # memplan.graph's op kinds that act per pixel


def handler_kind(gm: fx.GraphModule, n: fx.Node) -> str | None:
    """The :data:`HANDLERS` key of a call node, or None (not spatially local)."""
    if n.op == "call_module":
        m = gm.get_submodule(str(n.target))
        kind = next((k for t, k in _MODULE_KINDS if isinstance(m, t)), None)
    else:
        kind = _FUNCTION_KINDS.get(n.target) if n.op == "call_function" else None
        if n.target is operator.getitem and _is_tensor(n.args[0]) and len(_shape(n.args[0])) == 4:
            kind = "channel_slice"
    if kind is None and memplan_op_kind(n, gm) in _POINTWISE_KINDS:
        kind = "pointwise"
    return kind


# ------------------------------------------------------------------------------------------ graph facts
def _meta_outputs(n: fx.Node) -> list:
    meta = n.meta.get(META_KEY)
    return meta.outputs if meta is not None else []


def _is_tensor(n: Any) -> bool:
    return isinstance(n, fx.Node) and len(_meta_outputs(n)) == 1 and n.op != "output"


def _shape(n: Any) -> tuple[int, ...]:
    if isinstance(n, fx.Node):
        outs = _meta_outputs(n)
        return outs[0].shape if outs else ()
    return tuple(getattr(n, "shape", ()))


@dataclass(frozen=True)
class _Attr:
    """A parameter reached by attribute path (a module conv's weight), emitted as ``get_attr``."""

    path: str


def _param_side_node(n: fx.Node) -> bool:
    return bool(n.meta.get("_patch_param_side"))


def _inert(n: fx.Node) -> bool:
    return bool(n.meta.get("_patch_inert"))


def _mark_param_side(gm: fx.GraphModule) -> None:
    """Tag nodes computed only from parameters, buffers and constants (docs/definitions.md §1), and
    *inert* ones: queries that make no tensor and feed none (``x.ndim == 4`` checks), which a patch
    neither needs nor changes."""
    for n in gm.graph.nodes:
        n.meta["_patch_param_side"] = n.op == "get_attr" or (
            n.op in _CALLS and all(_param_side_node(a) for a in n.all_input_nodes))
    for n in reversed(gm.graph.nodes):
        n.meta["_patch_inert"] = n.op in _CALLS and not _param_side_node(n) and not _meta_outputs(n) \
            and all(_inert(u) for u in n.users)


@dataclass(frozen=True)
class Candidate:
    """A valid split node: its position in program order, map shape and the prefix before it."""

    node: str
    index: int
    shape: tuple[int, ...]
    prefix: tuple[str, ...]  # tensor call nodes up to and including the split, program order


def local_ops(cg: CapturedGraph) -> tuple[dict[str, LocalOp], list[Candidate], str]:
    """The spatially local ops from the input on, the valid split points among them, and what ends them.

    The third value says why no later split is possible (the first op that is not spatially local).
    """
    gm = cg.gm
    _mark_param_side(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1 or len(_shape(placeholders[0])) != 4:
        raise PatchError("patching needs one 4-d (N, C, H, W) image input")
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    ops: dict[str, LocalOp] = {}
    prefix: list[fx.Node] = []
    candidates: list[Candidate] = []
    stop = "the graph ends"
    x = placeholders[0]
    for n in nodes:
        if n.op in ("placeholder", "get_attr") or _param_side_node(n) or _inert(n):
            continue
        if n.op == "output":
            stop = "the graph ends"
            break
        if not _is_tensor(n) or len(_shape(n)) != 4:
            stop = f"node '{n.name}' ({target_name(n, gm)}) has no single 4-d output"
            break
        kind = handler_kind(gm, n)
        local = HANDLERS[kind].read(gm, n) if kind else "not spatially local"
        if isinstance(local, str):
            stop = f"node '{n.name}' ({target_name(n, gm)}) is not patchable: {local}"
            break
        ops[n.name] = local
        prefix.append(n)
        last = order[n]
        inside = [x, *prefix[:-1]]
        if any(order[u] > last for p in inside for u in p.users if not _inert(u)):
            continue
        users = list(n.users)
        if len(users) == 1 and users[0].op in _CALLS and handler_kind(gm, users[0]) == "pointwise" \
                and all(_param_side_node(a) or a is n for a in users[0].all_input_nodes):
            continue  # the pointwise op after it runs in place: splitting after it is never worse
        candidates.append(Candidate(n.name, last, _shape(n), tuple(p.name for p in prefix)))
    return ops, candidates, stop


# ------------------------------------------------------------------------------------------ regions
def _tiles(size: int, parts: int, distinct: bool = False) -> list[Range]:
    """``parts`` consecutive ranges covering ``size``: as equal as can be, or (``distinct``, where
    ``size`` allows) of consecutive different lengths, so that no two patches have the same shape."""
    if distinct and parts > 1 and size >= parts * (parts + 1) // 2:
        a, r = divmod(size - parts * (parts - 1) // 2, parts)
        lengths = [a + i + (1 if i >= parts - r else 0) for i in range(parts)]
        edges = [sum(lengths[:i]) for i in range(parts + 1)]
    else:
        edges = [round(i * size / parts) for i in range(parts + 1)]
    return [(edges[i], edges[i + 1]) for i in range(parts)]


def _hull(a: Range | None, b: Range) -> Range:
    return b if a is None else (min(a[0], b[0]), max(a[1], b[1]))


def _clip(r: Range, size: int) -> Range:
    return max(r[0], 0), min(r[1], size)


def _axis_regions(
    gm: fx.GraphModule, cand: Candidate, ops: dict[str, LocalOp], axis: int, tile: Range,
    done: dict[str, int] | None = None,
) -> tuple[dict[str, Range], dict[tuple[str, str], Range]]:
    """Per-axis region of every prefix node (and the input) one tile needs; and what each op reads
    of each input, unclipped (the part outside the map is the op's padding).

    ``done`` (halo caching, row bands top to bottom): the rows each node computed in earlier bands;
    a node then computes only ``[max(need start, done), need end)`` and reads inputs for those rows.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    need: dict[str, Range] = {cand.node: tile}
    reads: dict[tuple[str, str], Range] = {}
    inside = set(cand.prefix)
    for name in reversed(cand.prefix):
        if name not in need:
            continue  # dead in the prefix
        n = nodes[name]
        op = ops[name]
        comp = _computed(need[name], done, name)
        if comp[0] >= comp[1]:
            continue
        for a in n.all_input_nodes:
            if _param_side_node(a) or not (a.name in inside or a.op == "placeholder"):
                continue
            r = op.windows[axis].input_range(comp) if op.kind != "pointwise" else comp
            reads[(name, a.name)] = r
            need[a.name] = _hull(need.get(a.name), _clip(r, _shape(a)[2 + axis]))
    return need, reads


def _computed(need: Range, done: dict[str, int] | None, name: str) -> Range:
    return need if done is None else (max(need[0], done.get(name, need[0])), need[1])


@dataclass(frozen=True)
class _Band:
    """One row band of a cached-halo schedule: the rows each node holds in it (``need``), what each
    op reads of each input (unclipped), the rows each node computed before it (``done``), the first
    row a later band reads again of each node (``keep``: the line buffer) and the split map's rows
    it delivers (``out``, None when it only fills line buffers)."""

    need: dict[str, Range]
    reads: dict[tuple[str, str], Range]
    done: dict[str, int]
    keep: dict[str, int]
    out: Range | None


def _band_regions(
    gm: fx.GraphModule, cand: Candidate, ops: dict[str, LocalOp], parts: int, distinct: bool = False,
    pace: str = "split", lean: bool = False, stream: bool = False,
) -> list[_Band]:
    """Row regions of every band when each row is computed once (halo rows cached between bands).

    ``pace="split"``: band ``i`` delivers the ``i``-th of ``parts`` row tiles of the split map and
    computes everything it needs (the first band spans the receptive field of its first row).
    ``pace="input"``: band ``i`` makes the ``i``-th of ``parts`` row tiles of the input available
    and every node computes all rows it then can (a line-buffer pipeline: no band holds a whole
    receptive field; the first bands deliver no split rows, the last delivers the rows still due).
    ``lean``: the nodes :func:`_recomputed` names keep no rows; each band recomputes the rows its
    readers need from their narrower inputs (an inverted residual's expansion), which keep them.
    """
    if pace not in PACES:
        raise PatchError(f"unknown band pace '{pace}' (use {' or '.join(PACES)})")
    rec = _recomputed(gm, cand, ops, stream) if lean else set()
    steps = _split_paced(gm, cand, ops, parts, distinct, rec) if pace == "split" else \
        _input_paced(gm, cand, ops, parts, distinct, rec)
    keeps: list[dict[str, int]] = []
    later: dict[str, int] = {}
    for need, _ in reversed(steps):  # the lowest row any later band reads of each node
        keeps.append(dict(later))
        for name, (lo, _) in need.items():
            if name not in rec:
                later[name] = min(lo, later.get(name, lo))
    keeps.reverse()
    done: dict[str, int] = {}
    tail: dict[str, Range] = {}  # the rows an earlier band kept
    out = []
    for (need, reads), keep in zip(steps, keeps):
        need = {name: _hull(tail.pop(name, None), r) for name, r in need.items()}
        split = need.get(cand.node)
        out.append(_Band(need, reads, dict(done), keep, split if split and split[0] < split[1] else None))
        for name, (_, hi) in need.items():
            if name in rec:
                continue
            done[name] = max(done.get(name, 0), hi)
            if name in keep and keep[name] < hi:
                tail[name] = (keep[name], hi)
    return out


def _recomputed(gm: fx.GraphModule, cand: Candidate, ops: dict[str, LocalOp], stream: bool) -> set[str]:
    """Prefix nodes whose rows are cheaper to recompute than to keep: row-local ops (pointwise, or
    windows of one row and stride 1, e.g. a 1x1 conv) whose inputs, kept (or recomputed in turn),
    take fewer bytes per row than their own output. A resident input costs nothing to re-read."""
    nodes = {n.name: n for n in gm.graph.nodes}
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    cost: dict[str, float] = {x.name: _row_bytes(x) if stream else 0.0}
    rec = set()
    for name in cand.prefix:
        n, op = nodes[name], ops[name]
        own = _row_bytes(n)
        w = op.windows[0]
        ins = [a.name for a in n.all_input_nodes if a.name in cost and not _param_side_node(a)]
        if name != cand.node and ins and (op.kind == "pointwise" or (w.kernel, w.stride) == (1, 1)):
            again = sum(cost[a] for a in ins)
            if again < own:
                rec.add(name)
                own = again
        cost[name] = own
    return rec


def _split_paced(gm: fx.GraphModule, cand: Candidate, ops: dict[str, LocalOp], parts: int,
                 distinct: bool, rec: set[str]) -> list[tuple[dict[str, Range], dict[tuple[str, str], Range]]]:
    done: dict[str, int] = {}
    steps = []
    for tile in _tiles(cand.shape[2], parts, distinct):
        need, reads = _axis_regions(gm, cand, ops, 0, tile, done)
        steps.append((need, reads))
        for name, (_, hi) in need.items():
            if name not in rec:
                done[name] = max(done.get(name, 0), hi)
    return steps


def _input_paced(gm: fx.GraphModule, cand: Candidate, ops: dict[str, LocalOp], parts: int,
                 distinct: bool, rec: set[str]) -> list[tuple[dict[str, Range], dict[tuple[str, str], Range]]]:
    nodes = {n.name: n for n in gm.graph.nodes}
    total, _ = _axis_regions(gm, cand, ops, 0, (0, cand.shape[2]))
    x = next(n.name for n in gm.graph.nodes if n.op == "placeholder")
    prefix = [name for name in cand.prefix if name in total]
    inside = set(prefix) | {x}
    ins = {name: [a.name for a in nodes[name].all_input_nodes if a.name in inside and not _param_side_node(a)]
           for name in prefix}
    done = {name: lo for name, (lo, _) in total.items()}
    steps = []
    lo_x, hi_x = total.get(x, (0, 0))
    for _, f in _tiles(hi_x - lo_x, parts, distinct):
        avail = {x: lo_x + f}
        for name in prefix:  # every row each node can compute from the rows its inputs have
            op, hi = ops[name], total[name][1]
            if op.kind == "pointwise":
                can = min(avail[a] for a in ins[name])
            else:
                a = ins[name][0]
                can = hi if avail[a] >= total[a][1] else done[name]
                while can < hi and op.windows[0].input_range((can, can + 1))[1] <= avail[a]:
                    can += 1
            avail[name] = max(min(can, hi), done[name])
        need: dict[str, Range] = {}
        reads: dict[tuple[str, str], Range] = {}
        for name in reversed(prefix):  # readers first: a recomputed node makes what they read
            rows = need.get(name) if name in rec else (done[name], avail[name])
            if rows is None or rows[0] >= rows[1]:
                continue
            need[name] = _hull(need.get(name), rows)
            op = ops[name]
            for a in ins[name]:
                r = op.windows[0].input_range(rows) if op.kind != "pointwise" else rows
                reads[(name, a)] = r
                need[a] = _hull(need.get(a), _clip(r, _shape(nodes[a])[2]))
        steps.append((need, reads))
        done.update(avail)
    return steps


# ------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class PatchPlan:
    """Where to split and how: re-applied to the same model by :func:`apply_plan` (``--out`` writes it)."""

    split_node: str
    grid: tuple[int, int]  # tiles along height, width
    input_shape: tuple[int, ...]
    stream_input: bool = False
    halo: str = "recompute"  # or "cache"/"mixed": row bands that keep the rows a later band reads
    pace: str = "split"  # cached bands: grid[0] row tiles of the split map, or of the input (PACES)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"split_node": self.split_node, "grid": list(self.grid), "input_shape": list(self.input_shape),
                "stream_input": self.stream_input, "halo": self.halo, "pace": self.pace}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PatchPlan:
        """Inverse of :meth:`to_json`; a one-line :class:`PatchError` for a malformed document."""
        try:
            halo = str(doc.get("halo", "recompute"))
            if halo not in HALOS[1:]:
                raise ValueError(f"halo must be recompute, cache or mixed, not {halo!r}")
            pace = str(doc.get("pace", "split"))
            if pace not in PACES:
                raise ValueError(f"pace must be split or input, not {pace!r}")
            return cls(str(doc["split_node"]), tuple(int(g) for g in doc["grid"]),  # type: ignore[arg-type]
                       tuple(int(s) for s in doc["input_shape"]), bool(doc.get("stream_input", False)), halo, pace)
        except (KeyError, TypeError, ValueError) as e:
            raise PatchError(f"bad patch plan: {e!r}") from e

    @classmethod
    def load(cls, path: str | Path) -> PatchPlan:
        """Read a plan written as ``plan.json``."""
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise PatchError(f"cannot read patch plan '{path}': {e}") from e


@dataclass
class PatchResult:
    """The patched module and its numbers (bytes exact, deploy form unless ``form`` says otherwise)."""

    module: fx.GraphModule
    plan: PatchPlan
    peak_bytes: int  # unpatched peak (input resident)
    patched_peak_bytes: int
    macs: int
    patched_macs: int
    split_shape: tuple[int, ...]
    stop: str  # what bounds the split (first non-local op)
    max_abs_diff: float | None = None  # patched vs unpatched outputs on a seeded random input
    output_scale: float | None = None  # max |output| of the unpatched model on that input
    report: MemoryReport | None = field(default=None, repr=False)

    @property
    def mac_overhead(self) -> float:
        """Patched / unpatched conv+linear MACs (1.0 = no halo recomputation)."""
        return self.patched_macs / self.macs if self.macs else 1.0

    @property
    def reduction(self) -> float:
        """Unpatched peak / patched peak."""
        return self.peak_bytes / self.patched_peak_bytes

    def to_json(self) -> dict[str, Any]:
        """The JSON keys ``memplan patch --json`` writes."""
        return {"peak_bytes": self.peak_bytes, "patched_peak_bytes": self.patched_peak_bytes,
                "split_node": self.plan.split_node, "patches": list(self.plan.grid),
                "split_shape": list(self.split_shape), "mac_overhead": round(self.mac_overhead, 6),
                "macs": self.macs, "patched_macs": self.patched_macs, "max_abs_diff": self.max_abs_diff,
                "output_scale": self.output_scale, "reduction": round(self.reduction, 4),
                "stream_input": self.plan.stream_input, "halo": self.plan.halo, "pace": self.plan.pace,
                "input_shape": list(self.plan.input_shape),
                "bounded_by": self.stop}


# ------------------------------------------------------------------------------------------ MACs
def count_macs(cg: CapturedGraph) -> int:
    """Multiply-accumulates of the convolutions and linear layers of a captured graph.

    >>> import torch
    >>> count_macs(capture(torch.nn.Conv2d(3, 8, 3, groups=1), torch.empty(1, 3, 10, 10)))
    13824
    """
    gm, total = cg.gm, 0
    for n in gm.graph.nodes:
        kind = memplan_op_kind(n, gm) if n.op in _CALLS else None
        if kind not in ("conv", "linear") or not _meta_outputs(n):
            continue
        if n.op == "call_module":
            w = tuple(gm.get_submodule(str(n.target)).weight.shape)
        else:
            kw = _normalized(gm, n)
            weight = kw.get("weight", kw.get("mat2"))
            w = _shape(weight)
            if "mat2" in kw and "weight" not in kw:
                w = (w[-1], w[0])
        total += math.prod(_shape(n)) * math.prod(w[1:])
    return total


# ------------------------------------------------------------------------------------------ building
class _Builder:
    """Emits the patched graph for one candidate and grid."""

    def __init__(self, cg: CapturedGraph, ops: dict[str, LocalOp], cand: Candidate,
                 grid: tuple[int, int], stream_input: bool, target: str = "torch", halo: str = "recompute",
                 pace: str = "split") -> None:
        if target not in TARGETS:
            raise PatchError(f"unknown target '{target}' (use {' or '.join(TARGETS)})")
        cache = halo != "recompute"
        if cache and grid[1] != 1:
            raise PatchError(f"halo caching runs full-width row bands: grid {grid[0]}x{grid[1]} needs 1 column")
        self.cache, self.pace, self.lean = cache, pace, halo == "mixed"
        self.tails: dict[str, fx.Node] = {}
        self.cg, self.ops, self.cand, self.grid, self.stream = cg, ops, cand, grid, stream_input
        self.target = target
        self.g = fx.Graph()
        self.env: dict[str, fx.Node] = {}
        self.attrs: dict[str, fx.Node] = {}
        self.nodes = {n.name: n for n in cg.gm.graph.nodes}

    def build(self) -> fx.GraphModule:
        gm, g, cand = self.cg.gm, self.g, self.cand
        nodes = list(gm.graph.nodes)
        inside = set(cand.prefix)
        for n in nodes:  # the input, parameter-side values and shape queries of the input, once
            if n.op == "placeholder" or _param_side_node(n):
                self.env[n.name] = g.node_copy(n, lambda a: self.env[a.name])
        H, W = cand.shape[2:]
        out = None
        bands: list[fx.Node] = []
        band: list[fx.Node] = []

        def place(tile: fx.Node, rows: Range, cols: Range) -> None:  # right after the tile: it dies here
            nonlocal out
            if self.target == "onnx":
                band.append(tile)
                return
            if out is None:
                batch = g.call_method("size", (tile, 0))
                out = g.create_node("call_method", "new_zeros", (tile, (batch, *cand.shape[1:])),
                                    name=f"{cand.node}_full")
            view = g.call_function(operator.getitem, (out, _slices(rows, cols)))
            g.call_method("copy_", (view, tile))

        def end_row() -> None:
            if band:
                bands.append(band[0] if len(band) == 1 else g.call_function(torch.cat, (list(band), 3)))
                band.clear()

        # the ONNX form gives every patch its own shape where the map allows: onnxruntime's planner
        # hands a freed buffer to the next tensor of the same shape and keeps it allocated from its
        # first user to its last, so equal patches would keep one buffer per layer through the loop
        distinct = self.target == "onnx"
        if self.cache:
            self.cols = _axis_regions(gm, cand, self.ops, 1, (0, W))
            for i, b in enumerate(_band_regions(gm, cand, self.ops, self.grid[0], distinct, self.pace, self.lean,
                                                self.stream)):
                tile = self._band(nodes, b, f"b{i}")
                if b.out is not None:
                    place(tile, b.out, (0, W))
                    end_row()
        else:
            for r, rows in enumerate(_tiles(H, self.grid[0], distinct)):
                for c, cols in enumerate(_tiles(W, self.grid[1], distinct)):
                    place(self._patch(nodes, rows, cols, f"p{r}_{c}"), rows, cols)
                end_row()
        if bands:
            out = bands[0] if len(bands) == 1 else g.create_node("call_function", torch.cat, (bands, 2),
                                                                   name=f"{cand.node}_full")
        self.env[cand.node] = out
        for n in nodes:
            if n.op in ("placeholder",) or n.name in inside or n.name in self.env or _inert(n):
                continue
            self.env[n.name] = g.node_copy(n, lambda a: self.env[a.name])
        g.lint()
        pm = fx.GraphModule(gm, g, f"Patched{self.cg.model_name}")
        return pm

    def _patch(self, nodes: list[fx.Node], rows: Range, cols: Range, tag: str) -> fx.Node:
        gm, g = self.cg.gm, self.g
        need_h, reads_h = _axis_regions(gm, self.cand, self.ops, 0, rows)
        need_w, reads_w = _axis_regions(gm, self.cand, self.ops, 1, cols)
        penv: dict[str, fx.Node] = {}
        have: dict[str, tuple[Range, Range]] = {}  # rows, columns each patch tensor holds (>= its need)
        cache: dict[tuple[str, Range, Range], fx.Node] = {}
        x = next(n for n in nodes if n.op == "placeholder")
        if x.name in need_h:
            full = ((0, _shape(x)[2]), (0, _shape(x)[3]))
            region = (need_h[x.name], need_w[x.name])
            src = self.env[x.name]
            if region != full:
                src = g.create_node("call_function", operator.getitem, (src, _slices(*region)), name=f"input_{tag}")
            if self.stream:
                src = g.create_node("call_method", "clone", (src,), name=f"input_crop_{tag}")
            penv[x.name] = src
            have[x.name] = region

        def crop(a: fx.Node, want_h: Range, want_w: Range) -> fx.Node:
            have_h, have_w = have[a.name]
            key = (a.name, want_h, want_w)
            if (want_h, want_w) == (have_h, have_w):
                return penv[a.name]
            if key not in cache:
                rel = ((want_h[0] - have_h[0], want_h[1] - have_h[0]), (want_w[0] - have_w[0], want_w[1] - have_w[0]))
                cache[key] = g.call_function(operator.getitem, (penv[a.name], _slices(*rel)))
            return cache[key]

        for name in self.cand.prefix:
            if name not in need_h:
                continue
            n = self.nodes[name]
            op = self.ops[name]
            if op.kind == "pointwise":
                penv[name], have[name] = self._pointwise(n, (need_h[name], need_w[name]), penv, have, crop, tag)
                continue
            a = n.all_input_nodes[0] if n.op == "call_module" else _normalized(gm, n)["input"]
            rh, rw = reads_h[(name, a.name)], reads_w[(name, a.name)]
            ah, aw = _shape(a)[2:]
            src = crop(a, _clip(rh, ah), _clip(rw, aw))
            pads = ((max(0, -rh[0]), max(0, rh[1] - ah)), (max(0, -rw[0]), max(0, rw[1] - aw)))
            kwargs = {k: self._value(v) for k, v in op.kwargs.items()}
            sym = tuple(max(p) for p in pads)
            skip = tuple((sym[i] - pads[i][0]) // op.windows[i].stride for i in range(2))
            if self.target == "torch" and any(sym) and \
                    all((sym[i] - pads[i][0]) % op.windows[i].stride == 0 for i in range(2)):
                # the op's own (symmetric) padding: the few surplus outputs that read zeros past the
                # patch's interior side are computed but never read (consumers crop to their need)
                kwargs["padding"] = sym
                penv[name] = g.create_node("call_function", op.call, (src,), kwargs, name=f"{name}_{tag}")
                lengths = (_clip(rh, ah)[1] - _clip(rh, ah)[0], _clip(rw, aw)[1] - _clip(rw, aw)[0])
                w = op.windows
                count = [(lengths[i] + 2 * sym[i] - w[i].dilation * (w[i].kernel - 1) - 1) // w[i].stride + 1
                         for i in range(2)]
                start = (need_h[name][0] - skip[0], need_w[name][0] - skip[1])
                have[name] = ((start[0], start[0] + count[0]), (start[1], start[1] + count[1]))
                continue
            if any(sym):
                src = g.call_function(F.pad, (src, (*pads[1], *pads[0])), {"value": op.pad_value})
            penv[name] = g.create_node("call_function", op.call, (src,), kwargs, name=f"{name}_{tag}")
            have[name] = (need_h[name], need_w[name])
        return crop(self.nodes[self.cand.node], need_h[self.cand.node], need_w[self.cand.node])

    def _band(self, nodes: list[fx.Node], band: _Band, tag: str) -> fx.Node | None:
        """One row band with halo caching: each node computes only rows no earlier band computed,
        joins them to the rows an earlier band left it (a clone of just those rows) and leaves a
        later band the rows it will need again. Returns the split map's rows (None: none yet)."""
        gm, g = self.cg.gm, self.g
        need, reads, done, keep = band.need, band.reads, band.done, band.keep
        need_w, reads_w = self.cols
        avail: dict[str, fx.Node] = {}
        extra: dict[str, int] = {}  # rows past the need at the end of a band tensor (never read)

        def rows(t: fx.Node, r: Range) -> fx.Node:
            return g.call_function(operator.getitem, (t, (slice(None), slice(None), slice(*r))))

        def finish(name: str, new: fx.Node | None, surplus: int = 0) -> None:
            lo, hi = need[name]
            parts = ([self.tails.pop(name)] if name in self.tails else []) + ([new] if new is not None else [])
            t = parts[0] if len(parts) == 1 else g.call_function(torch.cat, (parts, 2))
            avail[name], extra[name] = t, surplus
            if name in keep and keep[name] < hi:
                self.tails[name] = g.call_method("clone", (rows(t, (keep[name] - lo, hi - lo)),))

        def crop(a: fx.Node, want: Range) -> fx.Node:
            have = need[a.name]
            if want == have and not extra.get(a.name):
                return avail[a.name]
            return rows(avail[a.name], (want[0] - have[0], want[1] - have[0]))

        x = next(n for n in nodes if n.op == "placeholder")
        streamed = self._streamed_readers(x) if self.stream else set()
        if x.name in need and not streamed:
            cols = slice(*need_w[x.name]) if need_w[x.name] != (0, _shape(x)[3]) else slice(None)
            comp = _computed(need[x.name], done, x.name) if self.stream else need[x.name]
            src = self.env[x.name]
            if comp != (0, _shape(x)[2]) or cols != slice(None):
                src = g.create_node("call_function", operator.getitem,
                                    (src, (slice(None), slice(None), slice(*comp), cols)), name=f"input_{tag}")
            if self.stream:
                finish(x.name, g.create_node("call_method", "clone", (src,), name=f"input_rows_{tag}"))
            else:
                avail[x.name] = src
        for name in self.cand.prefix:
            if name not in need:
                continue
            n, op = self.nodes[name], self.ops[name]
            comp = _computed(need[name], done, name)
            if comp[0] >= comp[1]:
                finish(name, None)
                continue
            if op.kind == "pointwise":
                finish(name, *self._band_pointwise(n, comp, need_w[name], need, avail, extra, crop, tag))
                continue
            a = n.all_input_nodes[0] if n.op == "call_module" else _normalized(gm, n)["input"]
            if name in streamed:
                finish(name, self._streamed_rows(n, op, x, comp, need_w, tag))
                continue
            rh, rw = reads[(name, a.name)], reads_w[(name, a.name)]
            ah, aw = _shape(a)[2:]
            src = crop(a, _clip(rh, ah))
            pad_h, pad_w = (max(0, -rh[0]), max(0, rh[1] - ah)), (max(0, -rw[0]), max(0, rw[1] - aw))
            kwargs = {k: self._value(v) for k, v in op.kwargs.items()}
            surplus = 0
            # full-width columns: the op's own left padding on both sides when the right one only
            # adds windows the floor division drops (a strided conv whose last window ends early)
            wc = op.windows[1]
            cols_ok = pad_w[0] >= pad_w[1] and (aw + 2 * pad_w[0] - wc.dilation * (wc.kernel - 1) - 1) // wc.stride \
                + 1 == need_w[name][1] - need_w[name][0]
            if pad_h == (0, 0) and cols_ok:
                kwargs["padding"] = (0, pad_w[0])
            elif self.target == "torch" and pad_h[1] == 0 and cols_ok and \
                    self._surplus(n, a, op, rh, comp, pad_h[0]) * _row_bytes(n) < \
                    (_clip(rh, ah)[1] - _clip(rh, ah)[0] + pad_h[0]) * _row_bytes(a) * (aw + 2 * pad_w[0]) / aw:
                # the top band: the op's own padding instead of a padded copy of its input, when the
                # surplus rows at the band's bottom (they read zeros and are never read) cost less
                kwargs["padding"] = (pad_h[0], pad_w[0])
                surplus = self._surplus(n, a, op, rh, comp, pad_h[0])
            elif any(pad_h + pad_w):
                src = g.call_function(F.pad, (src, (*pad_w, *pad_h)), {"value": op.pad_value})
            finish(name, g.create_node("call_function", op.call, (src,), kwargs, name=f"{name}_{tag}"), surplus)
        return crop(self.nodes[self.cand.node], need[self.cand.node]) if band.out is not None else None

    def _streamed_readers(self, x: fx.Node) -> set[str]:
        """The windowed ops that read a streamed input when all its readers are windowed ops whose
        windows do not overlap along the rows (kernel <= stride, a patchify stem): they run one
        output row at a time on just the input rows it reads, so no band of the input is resident."""
        readers = [u for u in x.users if u.name in self.cand.prefix]
        windows = [self.ops[u.name].windows[0] for u in readers if self.ops[u.name].kind != "pointwise"]
        ok = readers and len(windows) == len(readers) and all(w.dilation * (w.kernel - 1) + 1 <= w.stride
                                                                for w in windows)
        return {u.name for u in readers} if ok else set()

    def _streamed_rows(self, n: fx.Node, op: LocalOp, x: fx.Node, comp: Range, need_w: dict[str, Range],
                       tag: str) -> fx.Node:
        """Output rows ``comp`` of a windowed op over the streamed input, a row at a time: each row
        copies the input rows its windows read (zeros past the borders) and nothing else."""
        g, w, (xh, xw) = self.g, op.windows[0], _shape(x)[2:]
        rw = op.windows[1].input_range(need_w[n.name])
        pad_w = (max(0, -rw[0]), max(0, rw[1] - xw))
        kwargs = {k: self._value(v) for k, v in op.kwargs.items()}
        kwargs["padding"] = (0, 0)
        parts = []
        for r in range(*comp):
            lo, hi = w.input_range((r, r + 1))
            rows = g.call_function(operator.getitem, (self.env[x.name], _slices(_clip((lo, hi), xh), _clip(rw, xw))))
            src = g.call_method("clone", (rows,))
            pads = (*pad_w, max(0, -lo), max(0, hi - xh))
            if any(pads):
                src = g.call_function(F.pad, (src, pads), {"value": op.pad_value})
            parts.append(g.create_node("call_function", op.call, (src,), kwargs, name=f"{n.name}_{tag}_r{r}"))
        return parts[0] if len(parts) == 1 else g.call_function(torch.cat, (parts, 2))

    @staticmethod
    def _surplus(n: fx.Node, a: fx.Node, op: LocalOp, rh: Range, comp: Range, pad: int) -> int:
        """Output rows past ``comp`` a windowed op computes over its clipped input with padding ``pad``."""
        w, ah = op.windows[0], _shape(a)[2]
        length = _clip(rh, ah)[1] - _clip(rh, ah)[0]
        return (length + 2 * pad - w.dilation * (w.kernel - 1) - 1) // w.stride + 1 - (comp[1] - comp[0])

    def _band_pointwise(self, n: fx.Node, comp: Range, cols: Range, need: dict[str, Range],
                        avail: dict[str, fx.Node], extra: dict[str, int],
                        crop: Callable[[fx.Node, Range], fx.Node], tag: str) -> tuple[fx.Node, int]:
        """A pointwise op over one band's new rows. Over a lone input with surplus rows it runs over
        all of them (in place over its producer) and passes the surplus on."""
        g, full = self.g, tuple(_shape(n)[2:])
        spatial = [a for a in n.all_input_nodes if a.name in avail]
        constant_maps = [a for a in n.all_input_nodes if a.name not in avail and _is_tensor(a)
                         and tuple(_shape(a)[-2:]) == full and full != (1, 1)]
        whole = len(spatial) == 1 and not constant_maps and need[spatial[0].name] == comp \
            and extra.get(spatial[0].name, 0) > 0

        def arg(a: fx.Node) -> fx.Node:
            if a.name in avail:
                return avail[a.name] if whole else crop(a, comp)
            if a in constant_maps:
                return g.call_function(operator.getitem, (self.env[a.name], (Ellipsis, slice(*comp), slice(*cols))))
            return self.env[a.name]

        new = g.node_copy(n, arg)
        new.name = g._graph_namespace.create_name(f"{n.name}_{tag}", None)
        return new, extra[spatial[0].name] if whole else 0

    def _value(self, v: Any) -> Any:
        """An op argument in the new graph: original nodes map to their copies, parameters to get_attr."""
        if isinstance(v, _Attr):
            if v.path not in self.attrs:
                self.attrs[v.path] = self.g.get_attr(v.path)
            return self.attrs[v.path]
        return self.env[v.name] if isinstance(v, fx.Node) else v

    def _pointwise(self, n: fx.Node, need: tuple[Range, Range], penv: dict[str, fx.Node],
                   have: dict[str, tuple[Range, Range]], crop: Callable[[fx.Node, Range, Range], fx.Node],
                   tag: str) -> tuple[fx.Node, tuple[Range, Range]]:
        """Re-emit a pointwise op for one patch. With one patch input (and no full-size constant map)
        it runs over all the input holds, so an activation stays in place over its producer."""
        full = tuple(_shape(n)[2:])
        g = self.g
        spatial = [a for a in n.all_input_nodes if a.name in penv]
        constant_maps = [a for a in n.all_input_nodes if a.name not in penv and _is_tensor(a)
                         and tuple(_shape(a)[-2:]) == full and full != (1, 1)]
        region = have[spatial[0].name] if len(spatial) == 1 and not constant_maps else need

        def arg(a: fx.Node) -> fx.Node:
            if a.name in penv:
                return crop(a, *region)
            v = self.env[a.name]
            if a in constant_maps:
                return g.call_function(operator.getitem, (v, (Ellipsis, slice(*region[0]), slice(*region[1]))))
            return v

        new = g.node_copy(n, arg)
        new.name = g._graph_namespace.create_name(f"{n.name}_{tag}", None)
        return new, region


def _row_bytes(n: fx.Node) -> float:
    """Bytes of one full-width row of a node's 4-d output."""
    return _meta_outputs(n)[0].nbytes / _shape(n)[2]


def _slices(rows: Range, cols: Range) -> tuple[slice, ...]:
    return (slice(None), slice(None), slice(*rows), slice(*cols))


# ------------------------------------------------------------------------------------------ estimate
@dataclass(frozen=True)
class _Estimate:
    cand: Candidate
    grid: tuple[int, int]
    peak: int
    macs: int
    halo: str = "recompute"
    pace: str = "split"

    @property
    def cache(self) -> bool:
        return self.halo != "recompute"


class _Estimator:
    """Peak and MACs of a split and grid without building it: the unpatched liveness of every prefix
    step with each tensor scaled to its per-patch region (regions are boxes: one axis at a time)."""

    def __init__(self, cg: CapturedGraph, ops: dict[str, LocalOp], report: MemoryReport, stream: bool) -> None:
        self.cg, self.ops, self.report, self.stream = cg, ops, report, stream
        g = report.graph
        self.nodes = {n.name: n for n in cg.gm.graph.nodes}
        self.x = next(n for n in cg.gm.graph.nodes if n.op == "placeholder")
        self.step = {name: i for i, name in enumerate(report.order)}
        live = live_bytes(report.lifetimes, len(report.order))
        self.live = live
        self.input_bytes = sum(st.nbytes for st in g.storages.values() if st.is_input)
        self.total_macs = count_macs(cg)
        self.conv_macs = {n.name: _node_macs(cg, n) for n in cg.gm.graph.nodes if n.name in ops
                          and ops[n.name].kind == "conv"}
        self._axis: dict[tuple[str, int, int], list[dict[str, Range]]] = {}

    def _lengths(self, cand: Candidate, axis: int, parts: int) -> list[dict[str, Range]]:
        key = (cand.node, axis, parts)
        if key not in self._axis:
            self._axis[key] = [_axis_regions(self.cg.gm, cand, self.ops, axis, t)[0]
                               for t in _tiles(cand.shape[2 + axis], parts)]
        return self._axis[key]

    def estimate(self, cand: Candidate, grid: tuple[int, int], halo: str = "recompute",
                 pace: str = "split") -> _Estimate:
        g, last = self.report.graph, self.step[cand.node]
        cache, lean = halo != "recompute", halo == "mixed"
        if cache:  # row bands: the rows each band holds, plus the rows it keeps for a later band
            bands = _band_regions(self.cg.gm, cand, self.ops, grid[0], pace=pace, lean=lean, stream=self.stream)
            diff: list[np.ndarray] = [np.zeros(grid) for _ in range(last + 2)]
            regions = [[b.need for b in bands], self._lengths(cand, 1, 1)]
            held: dict[str, int] = {}  # rows kept across bands that do not read them
            for i, b in enumerate(bands):
                for name, rows in held.items():
                    if name not in b.need:
                        diff[0][i] += rows * _row_bytes(self.nodes[name])
                for name, (_, hi) in b.need.items():
                    held.pop(name, None)
                    if name in b.keep and b.keep[name] < hi:  # kept from when the band computes them
                        held[name] = hi - b.keep[name]
                        diff[min(self.step.get(name, 0), last)][i] += held[name] * _row_bytes(self.nodes[name])
        else:
            diff = [np.zeros(grid) for _ in range(last + 2)]
            regions = [self._lengths(cand, 0, grid[0]), self._lengths(cand, 1, grid[1])]

        def frac(axis: int, name: str, size: int) -> np.ndarray:
            return np.array([(r[name][1] - r[name][0]) if name in r else 0 for r in regions[axis]],
                            dtype=np.float64) / size

        scale: dict[int, np.ndarray] = {}
        for s, st in g.storages.items():
            name = st.producer or self.x.name
            if name not in regions[0][0] or (st.is_input and not self.stream):
                continue
            shape = _shape(self.nodes[name])
            scale[s] = np.outer(frac(0, name, shape[2]), frac(1, name, shape[3])) * st.nbytes
        split_bytes = _meta_outputs(self.nodes[cand.node])[0].nbytes
        for lt in self.report.lifetimes:
            if lt.storage in scale and lt.start <= last:
                diff[lt.start] = diff[lt.start] + scale[lt.storage]
                diff[min(lt.end, last) + 1] = diff[min(lt.end, last) + 1] - scale[lt.storage]
        acc, peak = np.zeros(grid), 0.0
        for t in range(last + 1):
            acc = acc + diff[t]
            peak = max(peak, float(acc.max()))
        peak += (0 if self.stream else self.input_bytes) + split_bytes
        suffix = max(self.live[last + 1:] or [0])
        macs = self.total_macs
        again = _recomputed(self.cg.gm, cand, self.ops, self.stream) if lean else set()
        for name in cand.prefix if not cache else again:
            if name in self.conv_macs and any(name in r for r in regions[0]):
                size = _shape(self.nodes[name])[2:]
                area = frac(0, name, size[0]).sum() * frac(1, name, size[1]).sum()
                macs += int(round(self.conv_macs[name] * (area - 1)))
        return _Estimate(cand, grid, int(max(peak, suffix)), macs, halo, pace)


# ------------------------------------------------------------------------------------------ the pass
def _as_input(x: torch.Tensor | Sequence[int]) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return torch.empty(x.shape, dtype=x.dtype, device="meta")
    return torch.empty(tuple(x), device="meta")


def measure_patched(module: nn.Module, x: torch.Tensor, *, stream_input: bool = False,
                    form: str = "deploy") -> tuple[int, MemoryReport, int]:
    """Peak (docs/definitions.md §1), report and conv/linear MACs of a patched module, from one capture.

    With ``stream_input`` the input image is left out of every step's live bytes: each patch's input
    crop is an explicit copy (see the module docstring), which is what a streamed camera delivers.
    """
    cg = _capture(module, x)
    rep = report_from_graph(build_graph(cg, form=form), model=cg.model_name)
    macs = count_macs(cg)
    if not stream_input:
        return rep.peak_bytes, rep, macs
    inputs = {s for s, st in rep.graph.storages.items() if st.is_input}
    lts: list[Lifetime] = [lt for lt in rep.lifetimes if lt.storage not in inputs]
    return max(live_bytes(lts, len(rep.order))), rep, macs


def _check(model: nn.Module, patched: nn.Module, shape: tuple[int, ...], seed: int = 0) -> tuple[float, float]:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    was = model.training
    model.eval()
    patched.eval()
    try:
        with torch.no_grad():
            ref, got = model(x), patched(x)
    finally:
        model.train(was)
    ref_t = [t for t in torch.utils._pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
    got_t = [t for t in torch.utils._pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    diff = max(float((a - b).abs().max()) for a, b in zip(ref_t, got_t))
    scale = max(float(a.abs().max()) for a in ref_t)
    return diff, scale


def _capture(model: nn.Module, x: torch.Tensor) -> CapturedGraph:
    was = model.training
    model.eval()
    try:
        return capture(model, x)
    finally:
        model.train(was)


def patch_model(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    *,
    grid: int | tuple[int, int] | None = None,
    budget: int | None = None,
    split_node: str | None = None,
    stream_input: bool = False,
    max_mac_overhead: float | None = 0.2,
    max_grid: int = 8,
    max_bands: int = 128,
    max_nodes: int = 20_000,
    verify: int = 3,
    check: bool = True,
    form: str = "deploy",
    target: str = "torch",
    halo: str = "auto",
    pace: str | None = None,
) -> PatchResult:
    """Patch ``model``'s early part (module docstring) at the split and grid with the lowest peak.

    ``grid`` fixes the grid (``n`` = n×n; else up to ``max_grid`` per side, and up to ``max_bands``
    cached row bands, fewer where bands times prefix ops would pass ``max_nodes``: the graph built); ``budget`` picks the least MAC overhead whose peak fits
    (:class:`PatchError` naming the best reachable peak when none does); otherwise the lowest peak
    whose MAC overhead is at most ``max_mac_overhead`` (None = any). ``split_node`` fixes the split.
    The estimate ranks every split and grid; the best-ranked ``verify`` splits are built and analysed
    exactly (for cached bands, the finest bands of each as well).
    ``check`` runs both models on a seeded random input and reports ``max_abs_diff``.
    ``target`` picks the graph form. ``"torch"``: each tile is copied into one pre-allocated map (peak:
    one patch plus the map) and a border patch's windowed op runs with its own symmetric padding, the
    surplus outputs dropped by a view. ``"onnx"``: no in-place op and no cropping views, which an ONNX
    runtime would copy (the exporter turns the in-place copies into slice-scatters that copy the whole
    map per tile; onnxruntime keeps cropped conv outputs): tiles are joined by ``torch.cat`` (the last
    concat holds the map twice), border padding is an explicit pad, and the tiles have consecutive
    different sizes where the map allows (no two patches of one shape, so onnxruntime's planner
    hands no patch's buffer on to the next and frees each after its last reader).
    ``halo``: ``"recompute"`` (MCUNetV2: every patch recomputes its halo; any grid), ``"cache"``
    (full-width row bands top to bottom; the halo rows a band shares with a later one are kept, so
    every row is computed once and the MACs do not grow), ``"mixed"`` (cached bands, but row-local
    ops wider than their inputs, such as an inverted residual's 1x1 expansion, keep no rows and
    recompute them from their kept inputs: fewer bytes, some MACs) or ``"auto"`` (all are searched).
    ``pace`` fixes what drives cached bands (:data:`PACES`, see :func:`_band_regions`; None: both).
    The model is deep-copied; the patched module does not share its parameters.
    """
    if halo not in HALOS:
        raise PatchError(f"unknown halo mode '{halo}' (use {', '.join(HALOS)})")
    x = _as_input(example_input)
    model = copy.deepcopy(model)
    cg = _capture(model, x)
    ops, cands, stop = local_ops(cg)
    if split_node is not None:
        cands = [c for c in cands if c.node == split_node]
        if not cands:
            raise PatchError(f"'{split_node}' is not a valid split node of {cg.model_name} (patching stops "
                             f"where {stop}); valid ones come from passes.patch.local_ops")
    base = report_from_graph(build_graph(cg, form=form), model=cg.model_name)
    cands = [c for c in cands if c.shape[2] >= 2 and c.shape[3] >= 2]
    if not cands:
        raise PatchError(f"{cg.model_name} cannot be patched: no split point before {stop}")
    est = _Estimator(cg, ops, base, stream_input)
    total_macs = est.total_macs
    grids = _grids(grid, max_grid)
    modes = HALOS[1:] if halo == "auto" else (halo,)
    if halo in ("cache", "mixed") and grid is not None and grids[0][1] != 1:
        raise PatchError(f"halo caching runs full-width row bands: grid {grids[0][0]}x{grids[0][1]} needs 1 column")
    estimates = []
    paces = PACES if pace is None else (pace,)
    for c in cands:
        for mode in modes:  # cached row bands: up to one row of the split map (or of the input) each
            cache = mode != "recompute"
            if mode == "mixed" and len(modes) > 1 and not _recomputed(cg.gm, c, ops, stream_input):
                continue  # nothing to recompute: the same bands as "cache"
            for p in paces if cache else ("split",):
                rows = c.shape[2] if p == "split" else x.shape[2]
                most = min(max_bands, max(2, max_nodes // len(c.prefix)))  # bands x prefix ops: the graph built
                options = grids if grid is not None or not cache else [(r, 1) for r in _band_counts(rows, most)]
                estimates += [est.estimate(c, gr, mode, p) for gr in options
                              if gr[0] <= rows and gr[1] <= c.shape[3] and (gr[1] == 1 or not cache)]
    if not estimates:
        raise PatchError(f"no grid fits the split maps of {cg.model_name}")
    ranked = _rank(estimates, budget, max_mac_overhead, total_macs, grid is not None)
    combos = list(dict.fromkeys((e.halo, e.pace) for e in ranked))
    if len(combos) > 1:  # verify the best of each halo mode and pace: their estimates err differently
        by_mode = [[e for e in ranked if (e.halo, e.pace) == m] for m in combos]
        ranked = [e for pair in itertools.zip_longest(*by_mode) for e in pair if e is not None]
    # verify different splits first: the estimate's error depends on the split far more than on the grid
    firsts: dict[tuple[str, str, str], _Estimate] = {}  # the best estimate of each split (and halo mode)
    finest: dict[tuple[str, str, str], _Estimate] = {}  # and, for cached bands, its most bands: under-rated
    for e in ranked:
        key = (e.cand.node, e.halo, e.pace)
        firsts.setdefault(key, e)
        if e.cache and (key not in finest or e.grid[0] > finest[key].grid[0]):
            finest[key] = e
    trials = [t for key, e in firsts.items() for t in (e, finest.get(key, e)) if t is e or t.grid != e.grid]
    ranked = trials + [e for e in ranked if e not in trials]
    if budget is not None and not ranked:
        lowest = min(estimates, key=lambda e: e.peak)
        raise PatchError(f"no split and grid of {cg.model_name} fits {budget:,} bytes: the best reachable peak is "
                         f"about {lowest.peak:,} bytes (split '{lowest.cand.node}', grid "
                         f"{lowest.grid[0]}x{lowest.grid[1]})")
    limit = None if grid is not None or budget is not None or max_mac_overhead is None else 1 + max_mac_overhead
    best: tuple[tuple, int, int, fx.GraphModule, _Estimate, MemoryReport] | None = None
    accepted: set[tuple[str, str, str]] = set()  # splits (and halo modes, paces) verified
    most = max(verify, len(combos))  # splits verified: at least one of each halo mode and pace
    for e in ranked[:6 * max(1, most)]:
        if (e.cand.node, e.halo, e.pace) not in accepted and len(accepted) >= most:
            break
        module = _Builder(cg, ops, e.cand, e.grid, stream_input, target, e.halo, e.pace).build()
        peak, rep, macs = measure_patched(module, x, stream_input=stream_input, form=form)
        over = macs / total_macs if total_macs else 1.0
        if limit is not None and over > limit:
            continue  # the estimate leaves out the few outputs a border patch's own padding adds
        fits = budget is None or peak <= budget
        key = (0 if fits else 1, over if budget is not None and fits else peak, over)
        if best is None or key < best[0]:
            best = (key, peak, macs, module, e, rep)
        accepted.add((e.cand.node, e.halo, e.pace))
        if budget is not None and fits:
            break
    if best is None:
        raise PatchError(f"no split and grid of {cg.model_name} stays within {max_mac_overhead:.0%} extra MACs")
    _, peak, macs, module, chosen, rep = best
    if budget is not None and peak > budget:
        lowest = min(estimates, key=lambda e: e.peak)
        raise PatchError(f"no split and grid of {cg.model_name} fits {budget:,} bytes: the best reachable peak is "
                         f"about {min(peak, lowest.peak):,} bytes (split '{lowest.cand.node}', grid "
                         f"{lowest.grid[0]}x{lowest.grid[1]})")
    plan = PatchPlan(chosen.cand.node, chosen.grid, tuple(x.shape), stream_input,
                     chosen.halo, chosen.pace)
    return _result(model, module, plan, base.peak_bytes, peak, total_macs, macs, chosen.cand, stop, rep, check)


def _result(model: nn.Module, module: fx.GraphModule, plan: PatchPlan, peak: int, patched: int, macs: int,
            patched_macs: int, cand: Candidate, stop: str, rep: MemoryReport, check: bool) -> PatchResult:
    res = PatchResult(module, plan, peak, patched, macs, patched_macs, cand.shape, stop, report=rep)
    if check:
        res.max_abs_diff, res.output_scale = _check(model, module, plan.input_shape)
    return res


def apply_plan(model: nn.Module, plan: PatchPlan, *, check: bool = True, form: str = "deploy",
               target: str = "torch") -> PatchResult:
    """Re-apply a saved :class:`PatchPlan` to the same model (same split node name and grid).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten())
    >>> apply_plan(net, PatchPlan("_1", (2, 2), (1, 3, 8, 8))).max_abs_diff
    0.0
    """
    r = patch_model(model, plan.input_shape, grid=plan.grid, split_node=plan.split_node,
                    stream_input=plan.stream_input, max_mac_overhead=None, verify=1, check=check, form=form,
                    target=target, halo=plan.halo, pace=plan.pace)
    return r


def _node_macs(cg: CapturedGraph, n: fx.Node) -> int:
    gm = cg.gm
    if n.op == "call_module":
        w = tuple(gm.get_submodule(str(n.target)).weight.shape)
    else:
        w = _shape(_normalized(gm, n)["weight"])
    return math.prod(_shape(n)) * math.prod(w[1:])


def _band_counts(rows: int, most: int) -> list[int]:
    """Band counts the search tries over ``rows`` rows: every count up to 16, then the counts that
    divide the rows evenly and a 1.25x ladder, up to ``most``."""
    ladder, k = set(range(2, 17)), 16
    while k < most:
        k = math.ceil(k * 1.25)
        ladder.add(k)
    ladder |= {d for d in range(17, most + 1) if rows % d == 0}
    return sorted(n for n in ladder if n <= min(rows, most))


def _grids(grid: int | tuple[int, int] | None, max_grid: int) -> list[tuple[int, int]]:
    if grid is not None:
        gr = (grid, grid) if isinstance(grid, int) else tuple(grid)
        if min(gr) < 1:
            raise PatchError(f"bad grid {gr}: need at least 1 patch per side")
        return [gr]  # type: ignore[list-item]
    return [(r, c) for r in range(1, max_grid + 1) for c in range(1, max_grid + 1) if r * c > 1]


def _rank(estimates: list[_Estimate], budget: int | None, max_over: float | None, total: int,
          fixed_grid: bool) -> list[_Estimate]:
    def over(e: _Estimate) -> float:
        return e.macs / total if total else 1.0

    if budget is not None:  # an empty list: no estimate fits (the caller reports the best reachable)
        return sorted((e for e in estimates if e.peak <= budget), key=lambda e: (over(e), e.peak))
    allowed = [e for e in estimates if fixed_grid or max_over is None or over(e) <= 1 + max_over]
    if not allowed:
        raise PatchError(f"every split and grid recomputes more than {max_over:.0%} extra MACs; "
                         "allow more (max_mac_overhead) or fix a grid")
    return sorted(allowed, key=lambda e: (e.peak, over(e)))
