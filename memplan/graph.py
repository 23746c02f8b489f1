"""The memory IR: ops in program order, the storages they allocate and read, and their dependencies.

A :class:`MemGraph` is built from a :class:`~memplan.capture.CapturedGraph` by :func:`build_graph`.
Aliases (views, getitem, in-place ops) share one storage because the fake tensors they came from
share one; a form (docs/definitions.md §2) may merge more storages: ``deploy`` folds eval BatchNorm into its
conv/linear and runs an activation in place over its producer's output when it is that output's
only reader; ``inplace_elementwise`` additionally lets add/mul/sub/div overwrite a same-size input
that no one else reads (ONNX Runtime's MayInplace). The rules are a table keyed by op kind.
"""

from __future__ import annotations

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
         nn.LeakyReLU, nn.ELU, nn.Hardtanh, nn.Mish, nn.SELU, nn.CELU, nn.PReLU),
        "act",
    ),
]
_NAME_KINDS: dict[str, str] = {
    **dict.fromkeys(["conv1d", "conv2d", "conv3d", "convolution", "conv_transpose2d", "_convolution"], "conv"),
    **dict.fromkeys(["linear", "addmm"], "linear"),
    **dict.fromkeys(["batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm"], "bn"),
    **dict.fromkeys(
        ["relu", "relu6", "hardswish", "hardsigmoid", "silu", "sigmoid", "tanh", "gelu", "leaky_relu",
         "elu", "hardtanh", "mish", "selu", "celu"],
        "act",
    ),
    **dict.fromkeys(["add", "iadd", "mul", "imul", "sub", "isub", "div", "truediv", "itruediv"], "eltwise"),
}


def op_kind(n: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    """Classify a node for the form rules (conv, linear, bn, act, eltwise or other)."""
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        return next((k for types, k in _MODULE_KINDS if isinstance(mod, types)), "other")
    return _NAME_KINDS.get(target_name(n, gm).rstrip("_"), "other")


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
    return apply_form(g, form, inplace_elementwise)


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

    def __init__(self, g: MemGraph) -> None:
        self.g = g
        self.parent = {s: s for s in g.storages}
        self.kind = {o.name: o.kind for o in g.ops}
        self.readers: dict[int, set[str]] = {s: set() for s in g.storages}
        for o in g.ops:
            for s in o.reads if not is_alias(o) else ():
                self.readers[s].add(o.name)

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


FORM_RULES: dict[str, dict[str, Rule]] = {
    "deploy": {"bn": _rule_fold_bn, "act": _rule_inplace_act},
    "as-written": {},
}


def _apply_rules(g: MemGraph, rules: dict[str, Rule]) -> MemGraph:
    m = _Merger(g)
    for i, op in enumerate(g.ops):
        rule = rules.get(op.kind)
        base = rule(m, op) if rule else None
        if base is not None:
            m.merge_into(op.writes[0], base, op.name)
            g.ops[i] = replace(op, writes=op.writes[1:])
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
