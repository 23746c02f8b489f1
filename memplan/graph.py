"""The memory IR: ops in program order, the storages they allocate and read, and their dependencies.

A :class:`MemGraph` is built from a :class:`~memplan.capture.CapturedGraph` by :func:`build_graph`.
Aliases (views, getitem, in-place ops) share one storage because the fake tensors they came from
share one; a form (docs/definitions.md §2) may merge more storages: ``deploy`` folds eval BatchNorm into its
conv/linear and runs an activation in place over its producer's output when it is that output's
only reader; ``inplace_elementwise`` additionally lets add/mul/sub/div overwrite a same-size input
that no one else reads (ONNX Runtime's MayInplace). The rules are a table keyed by op kind; the
deploy form also counts a fused elementwise chain over one tensor as one activation
(:func:`fused_regions`), split pieces and convs' zero padding as views, and quantize/dequantize
pairs at their integer size (docs/definitions.md §2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import networkx as nx
import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

from memplan.capture import META_KEY, CapturedGraph, NodeMeta, TensorMeta, target_name
from memplan.errors import MemplanError

FORMS = ("deploy", "as-written")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}


@dataclass
class Storage:
    """One block of activation memory (a tensor and all its aliases)."""

    id: int
    nbytes: int
    shape: tuple[int, ...]  # shape of the tensor that first wrote it
    dtype: str
    producer: str | None  # op name; None for a graph input
    module: str  # module path of the producer
    is_input: bool = False
    is_output: bool = False


@dataclass
class Op:
    """One executed op. ``reads`` and ``writes`` are storage ids; ``writes`` are new allocations."""

    name: str
    op: str  # normalised target name, e.g. "Conv2d", "relu", "add", "convolution"
    kind: str  # op kind used by the form rules: conv, linear, bn, act, eltwise, other
    module: str
    reads: tuple[int, ...]
    writes: tuple[int, ...]
    mutates: tuple[int, ...] = ()
    out_bytes: int = 0  # bytes of the op's tensor outputs as traced (aliases included)
    deps: tuple[str, ...] = ()  # data dependencies (op names) from the traced graph


@dataclass
class MemGraph:
    """Ops in program order plus the storages they touch.

    Example:
        >>> import torch
        >>> from memplan.capture import capture
        >>> g = build_graph(capture(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU()),
        ...                         torch.empty(1, 3, 8, 8)), form="deploy")
        >>> [(o.name, o.writes) for o in g.ops], g.storages[g.ops[0].writes[0]].nbytes
        ([('_0', (1,)), ('_1', ())], 1024)
    """

    ops: list[Op]
    storages: dict[int, Storage]
    form: str = "deploy"
    dtype: str = "float32"
    method: str = "fx"
    model_name: str = ""
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)

    def op_index(self) -> dict[str, int]:
        """Map op name to its position in program order."""
        return {o.name: i for i, o in enumerate(self.ops)}

    def dependencies(self) -> nx.DiGraph:
        """Ops as a DAG: traced data dependencies plus write-after-read edges for in-place ops.

        Any topological order of this DAG computes the same outputs as program order.
        """
        g = nx.DiGraph()
        g.add_nodes_from(o.name for o in self.ops)
        for o in self.ops:
            g.add_edges_from((d, o.name) for d in o.deps)
        last_write: dict[int, str] = {}
        reads_since: dict[int, list[str]] = {}
        for o in self.ops:
            for s in o.reads:
                if s in last_write:
                    g.add_edge(last_write[s], o.name)
                reads_since.setdefault(s, []).append(o.name)
            for s in o.mutates:
                g.add_edges_from((r, o.name) for r in reads_since.get(s, []) if r != o.name)
                last_write[s], reads_since[s] = o.name, []
        return g


# --------------------------------------------------------------------------- op kinds
_MODULE_KINDS: list[tuple[type[nn.Module], str]] = [
    (nn.modules.conv._ConvNd, "conv"),
    (nn.Linear, "linear"),
    (nn.modules.batchnorm._BatchNorm, "bn"),
    (
        (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.GELU,
         nn.LeakyReLU, nn.ELU, nn.Hardtanh, nn.Mish, nn.SELU, nn.CELU, nn.PReLU, nn.Softplus),
        "act",
    ),
]
_NAME_KINDS: dict[str, str] = {
    **dict.fromkeys(["conv1d", "conv2d", "conv3d", "convolution", "conv_transpose2d", "_convolution"], "conv"),
    # matmuls read strided operands (a transposed or permuted view) like linear layers do
    **dict.fromkeys(["linear", "addmm", "matmul", "bmm", "mm", "baddbmm"], "linear"),
    # a copy into another memory order (what matmul and reshape make of a permuted view in eager)
    **dict.fromkeys(["clone", "contiguous"], "layout"),
    **dict.fromkeys(["batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm"], "bn"),
    **dict.fromkeys(
        ["relu", "relu6", "hardswish", "hardsigmoid", "silu", "sigmoid", "tanh", "gelu", "leaky_relu",
         "elu", "hardtanh", "mish", "selu", "celu", "softplus"],
        "act",
    ),
    **dict.fromkeys(["add", "iadd", "mul", "imul", "sub", "isub", "div", "truediv", "itruediv"], "eltwise"),
    # other elementwise math: only ever part of a fused activation (docs/definitions.md §2)
    **dict.fromkeys(["erf", "exp", "log", "neg", "abs", "sqrt", "rsqrt", "reciprocal", "pow", "clamp", "clamp_min",
                     "clamp_max", "where", "gt", "lt", "ge", "le", "eq", "ne", "maximum", "minimum", "sign",
                     "square"], "pointwise"),
}


def op_kind(n: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    """Classify a node for the form rules (conv, linear, bn, act, eltwise, pointwise, pad or other)."""
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        return next((k for types, k in _MODULE_KINDS if isinstance(mod, types)), "other")
    name = target_name(n, gm).rstrip("_")
    if name in ("pad", "constant_pad_nd"):  # F.pad(x, p, mode, value) / aten.constant_pad_nd(x, p, value)
        at = 3 if name == "pad" else 2
        mode = n.kwargs.get("mode", n.args[2] if name == "pad" and len(n.args) > 2 else "constant")
        value = n.kwargs.get("value", n.args[at] if len(n.args) > at else 0)
        return "pad" if mode == "constant" and not value else "other"
    return _NAME_KINDS.get(name, "other")


# --------------------------------------------------------------------------- building
def _meta(n: torch.fx.Node) -> NodeMeta:
    return n.meta.get(META_KEY) or NodeMeta()


def build_graph(
    cg: CapturedGraph, *, form: str = "deploy", dtype: str = "float32", inplace_elementwise: bool = False
) -> MemGraph:
    """Build the memory IR of a captured model in ``form`` ("deploy" or "as-written").

    ``dtype`` ("float32", "float16", "int8", ...) is a what-if: floating storages are re-sized to
    that element size; integer storages (indices) keep theirs.
    """
    if form not in FORMS:
        raise MemplanError(f"unknown form '{form}' (use {' or '.join(FORMS)})")
    if dtype not in DTYPES:
        raise MemplanError(f"unknown dtype '{dtype}' (use {', '.join(DTYPES)})")
    itemsize = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    gm = cg.gm
    storages: dict[int, Storage] = {}
    ops: list[Op] = []
    # op names each node's value depends on; ops that return no tensor (x.size(0)) pass theirs on
    dep_ops: dict[torch.fx.Node, frozenset[str]] = {}
    counted = {s for s, k in cg.storage_kind.items() if k != "param"}
    attention: list[tuple[int, torch.fx.Node]] = []  # (op index, node) of fused attention ops

    def scaled(nbytes: int, tensor_dtype: torch.dtype) -> int:
        if not tensor_dtype.is_floating_point:
            return nbytes
        return nbytes // torch.empty(0, dtype=tensor_dtype).element_size() * itemsize

    def new_storage(tm: TensorMeta, producer: str | None, module: str) -> None:
        storages[tm.storage] = Storage(tm.storage, scaled(tm.storage_nbytes, tm.dtype), tm.shape,
                                       str(tm.dtype).replace("torch.", ""), producer, module,
                                       is_input=producer is None)

    for n in gm.graph.nodes:
        meta = _meta(n)
        inputs = [a for a in n.all_input_nodes if not _meta(a).param_side]
        deps = frozenset().union(*(dep_ops.get(a, frozenset()) for a in inputs))
        if n.op == "placeholder":
            for tm in meta.outputs:
                new_storage(tm, None, "")
            continue
        if n.op == "output":
            for a in pytree.tree_leaves(n.args):
                if isinstance(a, torch.fx.Node):
                    for tm in _meta(a).outputs:
                        if tm.storage in storages:
                            storages[tm.storage].is_output = True
            continue
        if meta.param_side:  # folded into a constant by a runtime (docs/definitions.md §1)
            continue
        if not meta.outputs:
            dep_ops[n] = deps
            continue
        if target_name(n, gm) == "getitem":
            reads = {tm.storage for tm in meta.outputs}
        else:
            reads = {tm.storage for a in inputs for tm in _meta(a).outputs}
        writes = []
        for tm in meta.outputs:
            if tm.storage in counted and tm.storage not in storages:
                new_storage(tm, n.name, meta.module)
                writes.append(tm.storage)
        if form == "deploy" and target_name(n, gm).lstrip("_").startswith(ATTENTION_OPS):
            attention.append((len(ops), n))
        dep_ops[n] = frozenset([n.name])
        ops.append(Op(
            name=n.name, op=target_name(n, gm), kind=op_kind(n, gm), module=meta.module,
            reads=tuple(sorted(s for s in reads if s in storages and s not in writes)),
            writes=tuple(writes), mutates=tuple(s for s in meta.mutates if s in storages),
            out_bytes=sum(scaled(tm.nbytes, tm.dtype) for tm in meta.outputs),
            deps=tuple(sorted(deps)),
        ))
    g = MemGraph(ops, storages, form=form, dtype=dtype, method=cg.method, model_name=cg.model_name,
                 input_shapes=list(cg.input_shapes))
    drop_byproducts(g)
    for i, n in attention:  # after the by-products: nobody reads them either, but they are the op's memory
        extra = attention_scores(n, storages, _meta(n).module, scaled)
        g.ops[i] = replace(g.ops[i], writes=(*g.ops[i].writes, *extra))
    return apply_form(g, form, inplace_elementwise)


ATTENTION_OPS = ("scaled_dot_product",)  # F.scaled_dot_product_attention and its ATen kernels


def attention_scores(n: torch.fx.Node, storages: dict[int, Storage], module: str,
                     scaled: Callable[[int, torch.dtype], int]) -> list[int]:
    """The ``(..., L, S)`` scores a fused attention op computes in deploy form, as the math
    implementation, an exported ONNX graph (MatMul, Softmax, MatMul) and any runtime without a fused
    attention kernel hold them (docs/definitions.md §2): scores and softmax live together, then the
    softmax and the output. The op's extra storages (nobody reads them, so they live during the op
    only) are the scores and ``max(0, scores - output)``: with its output, ``max(2 scores, scores + output)``."""
    args = [a for a in n.args[:2] if isinstance(a, torch.fx.Node)]
    if len(args) < 2:
        return []
    q, k = (_meta(a).outputs[0] for a in args)
    if len(q.shape) < 2 or len(k.shape) < 2:
        return []
    shape = (*q.shape[:-1], k.shape[-2])
    scores = scaled(math.prod(shape) * q.nbytes // max(1, math.prod(q.shape)), q.dtype)
    out = scaled(_meta(n).outputs[0].nbytes, _meta(n).outputs[0].dtype) if _meta(n).outputs else 0
    ids = []
    for nbytes in (scores, max(0, scores - out)):
        sid = min(0, *storages) - 1  # below every captured storage id
        storages[sid] = Storage(sid, nbytes, shape, str(q.dtype).replace("torch.", ""), n.name, module)
        ids.append(sid)
    return ids


def is_alias(op: Op) -> bool:
    """An op that allocates and writes nothing (view, getitem, detach, eval dropout).

    Its readers read the same storage, so it is not a reader of its own for the form rules.
    """
    return not op.writes and not op.mutates


def drop_byproducts(g: MemGraph) -> MemGraph:
    """Remove unread by-products: outputs no op reads, of an op whose other outputs are used.

    An aten-level graph spells ``max_pool2d`` as ``max_pool2d_with_indices`` whose indices nothing
    reads, and eval BatchNorm returns saved statistics nobody uses: the program never asked for
    them (an fx-level graph does not even show them), so they are not its memory
    (docs/definitions.md §1). An op none of whose outputs is used (dead code) keeps them all.
    """
    used = {s for o in g.ops if not is_alias(o) for s in o.reads} | {s for s, st in g.storages.items() if st.is_output}
    for i, o in enumerate(g.ops):
        if len(o.writes) > 1 and any(s in used for s in o.writes):
            keep = tuple(s for s in o.writes if s in used)
            for s in set(o.writes) - set(keep):
                del g.storages[s]
            g.ops[i] = replace(o, writes=keep)
    for i, o in enumerate(g.ops):
        g.ops[i] = replace(o, reads=tuple(s for s in o.reads if s in g.storages),
                           mutates=tuple(s for s in o.mutates if s in g.storages))
    return g


def apply_form(g: MemGraph, form: str, inplace_elementwise: bool = False) -> MemGraph:
    """Merge storages of ``g`` (built with no merges) by the rules of ``form``; returns ``g``.

    Frontends (torch.fx, ONNX) build the raw IR and call this, so every frontend shares the rules.
    """
    rules = dict(FORM_RULES[form])
    if inplace_elementwise:
        rules["eltwise"] = _rule_inplace_eltwise
    return _apply_rules(g, rules)


# --------------------------------------------------------------------------- form rules
class _Merger:
    """Union-find over storages, tracking each root's readers."""

    def __init__(self, g: MemGraph, regions: dict[str, FusedRegion] | None = None) -> None:
        self.g = g
        self.parent = {s: s for s in g.storages}
        self.kind = {o.name: o.kind for o in g.ops}
        self.op_of = {o.name: o for o in g.ops}
        self.readers: dict[int, set[str]] = {s: set() for s in g.storages}
        for o in g.ops:
            for s in o.reads if not is_alias(o) else ():
                self.readers[s].add(o.name)
        self.regions = regions or {}  # op name -> its fused activation region
        self.views: dict[int, bool] = {}  # storage -> whether the splits reading it are views

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def sole_reader(self, s: int, op: Op) -> bool:
        return self.readers[self.find(s)] == {op.name}

    def merge_into(self, out: int, base: int, writer: str) -> None:
        """``writer`` now writes its output into ``base``: it no longer counts as base's reader."""
        out, base = self.find(out), self.find(base)
        self.parent[out] = base
        self.readers[base] = (self.readers[base] - {writer}) | self.readers.pop(out)
        self.g.storages[base].is_output |= self.g.storages[out].is_output


Rule = Callable[[_Merger, Op], "int | None"]  # returns the input storage the op's output joins


def _single_input(m: _Merger, op: Op) -> int | None:
    """The op's one activation input if it is produced by an op and read by this op alone."""
    if len(op.writes) < 1 or len(op.reads) != 1:
        return None
    s = op.reads[0]
    st, out = m.g.storages[m.find(s)], m.g.storages[op.writes[0]]
    if st.is_input or not m.sole_reader(s, op) or st.nbytes != out.nbytes:
        return None
    return s


def _rule_fold_bn(m: _Merger, op: Op) -> int | None:
    s = _single_input(m, op)
    if s is None:
        return None
    producer = m.g.storages[m.find(s)].producer
    return s if m.kind.get(producer) in ("conv", "linear") else None


def _rule_inplace_act(m: _Merger, op: Op) -> int | None:
    return _single_input(m, op)


def _rule_inplace_eltwise(m: _Merger, op: Op) -> int | None:
    if not op.writes:
        return None
    out = m.g.storages[op.writes[0]]
    for s in op.reads:
        st = m.g.storages[m.find(s)]
        if not st.is_input and st.nbytes == out.nbytes and st.dtype == out.dtype and m.sole_reader(s, op):
            return s
    return None


def _input_if_read_only_by(m: _Merger, op: Op, kinds: tuple[str, ...], *, output_ok: bool = False) -> int | None:
    """The one storage ``op`` reads, when ops of ``kinds`` are the only readers of the one it writes
    (not a model output unless ``output_ok``): the storage the op's output is a view of."""
    if len(op.reads) != 1 or len(op.writes) != 1 or (not output_ok and m.g.storages[op.writes[0]].is_output):
        return None
    readers = m.readers[m.find(op.writes[0])]
    return op.reads[0] if readers and all(m.kind[r] in kinds for r in readers) else None


def _rule_fold_pad(m: _Merger, op: Op) -> int | None:
    """A zero padding only convs read is their own padding (as exporters fold it): no new storage."""
    return _input_if_read_only_by(m, op, ("conv",), output_ok=True)


def _rule_split_views(m: _Merger, op: Op) -> int | None:
    """Split/Slice pieces are views of their input when only splits read it (decided at the first)."""
    if len(op.reads) != 1 or not op.writes:
        return None
    s = m.find(op.reads[0])
    if s not in m.views:
        m.views[s] = all(m.kind[r] == "split" for r in m.readers[s])
    return s if m.views[s] else None


def _rule_broadcast_view(m: _Merger, op: Op) -> int | None:
    """An ``Expand`` that only element-wise ops (which broadcast) and layout copies (``Transpose``,
    which write their own output) read is a broadcast view of its input, as PyTorch's ``expand`` is:
    no new storage."""
    return _input_if_read_only_by(m, op, ("eltwise", "layout"))


def _rule_layout_view(m: _Merger, op: Op) -> int | None:
    """A layout copy (ONNX ``Transpose``; ``clone``/``contiguous`` in PyTorch, which eager matmul and
    reshape make of a permuted view) is a view, as ``permute`` is, when only ops that read strided
    operands read it and none writes into it: element-wise ops, matmuls (a transposed operand),
    broadcasts and further layout ops."""
    base = _input_if_read_only_by(m, op, ("layout", "broadcast", "eltwise", "linear"))
    if base is None:
        return None
    out = m.find(op.writes[0])
    return None if any(out in {m.find(s) for s in m.op_of[r].mutates} for r in m.readers[out]) else base


def _rule_dequantize(m: _Merger, op: Op) -> int | None:
    """A dequantized activation is computed inside its consumers: they read the integer tensor."""
    if len(op.reads) != 1 or len(op.writes) != 1 or m.g.storages[op.writes[0]].is_output:
        return None
    return op.reads[0]


def _rule_quantize(m: _Merger, op: Op) -> int | None:
    """Quantizing a value only this op reads: its producer writes the quantized tensor directly."""
    if len(op.reads) != 1 or len(op.writes) != 1:
        return None
    s = m.find(op.reads[0])
    st, q = m.g.storages[s], m.g.storages[op.writes[0]]
    if st.is_input or st.is_output or not m.sole_reader(s, op):
        return None
    st.nbytes, st.dtype = q.nbytes, q.dtype  # the merged storage holds the quantized values
    return s


@dataclass
class FusedRegion:
    """Ops that together compute one elementwise function of one tensor (docs/definitions.md §2)."""

    source: int  # the one activation storage the region reads from outside
    output: int  # the one storage it writes that is read outside it (or is a graph output)
    carrier: int  # the first storage it writes with the output's size: holds the result when not in place
    ops: frozenset[str]
    base: int | None = None  # decided at the region's first op: source (in place) or carrier


POINTWISE_KINDS = frozenset({"act", "eltwise", "pointwise"})


def fused_regions(g: MemGraph) -> dict[str, FusedRegion]:
    """The fused activations of ``g`` (no merges applied yet): op name -> region.

    An op of a pointwise kind (act, eltwise, pointwise) with one output is a function of one
    storage ``x`` when every input is ``x`` or the output of such a function of ``x`` and its output
    has ``x``'s element count (constants are not storages). The ops that are functions of ``x`` are
    split by the storage each computes for a reader outside them: each group needed by exactly one
    such storage, and sharing no op with another group, is one fused activation when it has two
    or more ops (``x * sigmoid(x)``, ``x * hardsigmoid(x)``, erf and tanh GELU chains, a thresholded
    softplus's ``Where``, ``relu(x) + 1``).

    Example:
        >>> import torch
        >>> from memplan.capture import capture
        >>> class Swish(torch.nn.Conv2d):
        ...     def forward(self, x):
        ...         y = super().forward(x)
        ...         return y * torch.sigmoid(y)
        >>> g = build_graph(capture(Swish(3, 4, 1), torch.empty(1, 3, 8, 8)), form="as-written")
        >>> r = fused_regions(g)
        >>> sorted(r), g.storages[r["mul"].source].producer
        (['mul', 'sigmoid'], 'conv2d')
    """
    numel = {s: math.prod(st.shape) for s, st in g.storages.items()}
    readers: dict[int, set[str]] = {s: set() for s in g.storages}
    for o in g.ops:
        for s in o.reads:
            readers[s].add(o.name)
    source_of: dict[int, int] = {}  # storage written by a pointwise op -> the storage it is a function of
    members: dict[int, list[Op]] = {}
    for o in g.ops:
        if o.kind not in POINTWISE_KINDS or len(o.writes) != 1 or not o.reads or o.mutates:
            continue
        sources = {source_of.get(s, s) for s in o.reads}
        if len(sources) == 1 and numel[o.writes[0]] == numel[next(iter(sources))]:
            source_of[o.writes[0]] = x = sources.pop()
            members.setdefault(x, []).append(o)
    mutated = {s for o in g.ops for s in o.mutates}
    regions: dict[str, FusedRegion] = {}
    for x, ops in members.items():
        names = {o.name for o in ops}
        written = {o.writes[0]: o for o in ops}
        if len(ops) < 2 or mutated & ({x} | written.keys()):
            continue
        groups = []
        for y, writer in written.items():
            if g.storages[y].is_output or readers[y] - names:
                group, todo = set(), [writer]
                while todo:
                    o = todo.pop()
                    if o.name not in group:
                        group.add(o.name)
                        todo += [written[s] for s in o.reads if s in written]
                groups.append((y, group))
        for y, group in groups:
            if len(group) < 2 or any(group & other for z, other in groups if z != y):
                continue
            carrier = next(o.writes[0] for o in ops if o.name in group
                           and g.storages[o.writes[0]].nbytes == g.storages[y].nbytes)
            region = FusedRegion(x, y, carrier, frozenset(group))
            regions.update(dict.fromkeys(group, region))
    return regions


def _rule_fused(m: _Merger, op: Op) -> int | None:
    """An op of a fused activation: in place over the source if the region alone reads it, as the
    activation rule does for one op; else into the region's carrier (one new storage)."""
    r = m.regions[op.name]
    if r.base is None:
        x = m.find(r.source)
        st, out = m.g.storages[x], m.g.storages[r.output]
        in_place = not (st.is_input or st.is_output) and m.readers[x] <= r.ops and st.nbytes == out.nbytes
        r.base = x if in_place else r.carrier
    return None if op.writes[0] == r.base else r.base


FUSED = "fused"  # the rule for ops of a fused activation region, ahead of their own kind's rule

FORM_RULES: dict[str, dict[str, Rule]] = {
    "deploy": {"bn": _rule_fold_bn, "act": _rule_inplace_act, "pad": _rule_fold_pad, "split": _rule_split_views,
               "broadcast": _rule_broadcast_view, "layout": _rule_layout_view, "dequantize": _rule_dequantize, "quantize": _rule_quantize, FUSED: _rule_fused},
    "as-written": {},
}
VIEW_KINDS = frozenset({"split"})  # every output of these ops joins the storage their rule returns


def _apply_rules(g: MemGraph, rules: dict[str, Rule]) -> MemGraph:
    regions = fused_regions(g) if FUSED in rules else {}
    m = _Merger(g, regions)
    for i, op in enumerate(g.ops):
        rule = rules[FUSED] if op.name in regions else rules.get(op.kind)
        base = rule(m, op) if rule else None
        if base is not None:
            joined = op.writes if op.kind in VIEW_KINDS else op.writes[:1]
            for s in joined:
                m.merge_into(s, base, op.name)
            g.ops[i] = replace(op, writes=tuple(s for s in op.writes if s not in joined))
    roots = {s for s in g.storages if m.find(s) == s}
    g.storages = {s: st for s, st in g.storages.items() if s in roots}
    for i, op in enumerate(g.ops):
        g.ops[i] = replace(
            op,
            reads=tuple(sorted({m.find(s) for s in op.reads})),
            writes=tuple(s for s in op.writes if s in roots),
            mutates=tuple(sorted({m.find(s) for s in op.mutates})),
        )
    return g
