"""The rewritable graph of a model: torch.fx when it traces, else torch.export.

A student pass rewrites strides in a graph and then runs that graph at other resolutions and batch
sizes. torch.fx keeps Python shape arithmetic symbolic, so an fx graph runs at any size. A model it
cannot trace (control flow on ``x.shape``, TF-style "same" padding computed with ``math.ceil``) is
exported with a symbolic batch (an example batch of 2) and the example's height and width: symbolic
spatial sizes would keep a "same" pad or a reshape back to a map true at any size, but torch.export
spends minutes on their nested expressions (tf_efficientnet_b0: 820 s against 2 s). The numbers that
depend on the size (pads, reshape sizes, interpolation sizes) are then constants of the graph;
:func:`passes.aggressive_pool.build_student` re-reads each from the teacher exported at the
resolution the student runs that op at, so an exported student runs at the resolution it was derived
at, with any batch. Where sizes do not divide by the factor, the student's rounding can differ from
a smaller teacher's; the student is then rebuilt on the graph exported with every dim symbolic
(``symbolic=True``: slow, exact, and it runs at any size).

The exported graph becomes a plain :class:`torch.fx.GraphModule` that keeps the model's parameter
names (``state_dict`` keys) and trains: ops whose behaviour depends on the mode (:data:`MODE_ARGS`:
batch norm, dropout) read the module's ``training`` flag, so ``.train()`` / ``.eval()`` work and
gradients flow as in any module.

Example:
    >>> import math, torch
    >>> class Same(torch.nn.Conv2d):
    ...     def forward(self, x):
    ...         pad = max((math.ceil(x.shape[-1] / 2) - 1) * 2 + 3 - x.shape[-1], 0)
    ...         return super().forward(torch.nn.functional.pad(x, [pad // 2, pad - pad // 2] * 2))
    >>> net = torch.nn.Sequential(Same(3, 4, 3, 2), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5))
    >>> gm, method = rewritable_graph(net, [torch.empty(1, 3, 9, 9)])
    >>> method, gm(torch.zeros(5, 3, 9, 9)).shape
    ('export', torch.Size([5, 4, 5, 5]))
    >>> gm.train().training, sorted(k for k in gm.state_dict())[:2]
    (True, ['0.bias', '0.weight'])
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from memplan.capture import CapturedGraph, StorageProp, capture, device_of
from memplan.errors import MemplanError, describe_error

__all__ = ["MODE_ARGS", "anchor_sizes", "capture_rewritable", "export_graph", "rewritable_graph"]

_ATEN = torch.ops.aten
MODE_ARGS: dict[object, int] = {  # exported op -> index of its "training" argument
    _ATEN.batch_norm.default: 5,
    _ATEN.dropout.default: 2,
    _ATEN.feature_dropout.default: 2,
    _ATEN.alpha_dropout.default: 2,
}


def export_graph(model: nn.Module, inputs: Sequence[torch.Tensor], symbolic: bool = False) -> fx.GraphModule:
    """The torch.export graph of ``model`` at the sizes of ``inputs`` (batch symbolic; every dim with
    ``symbolic``, sizes then re-read where they are used: :func:`anchor_sizes`), as a trainable
    :class:`torch.fx.GraphModule` (module docstring)."""
    from torch.export import Dim

    device = device_of(model)  # a meta model exports on meta examples (a sweep never allocates)
    examples = tuple(torch.zeros((max(2, t.shape[0]), *t.shape[1:]) if t.dim() else (), dtype=t.dtype,
                                 device=device) for t in inputs)
    dynamic = tuple({d: Dim.AUTO for d in range(t.dim() if symbolic else min(t.dim(), 1))} for t in examples)
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ep = torch.export.export(copy.deepcopy(model).eval(), examples, dynamic_shapes=dynamic, strict=False)
    finally:
        logging.disable(logging.NOTSET)
    exported = ep.module()
    gm = fx.GraphModule(exported, exported.graph, type(model).__name__)
    graph = gm.graph
    if symbolic:
        anchor_sizes(graph)
    for node in list(graph.nodes):
        if node.op == "call_module" and not node.users:  # export's shape-guard call
            graph.erase_node(node)
    flag = None
    for node in graph.nodes:
        index = MODE_ARGS.get(node.target)
        if index is None or len(node.args) <= index:
            continue
        if node.target is _ATEN.batch_norm.default and node.args[3] is None:
            continue  # no running stats (weight standardisation): batch statistics in either mode
        if flag is None:
            with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "training" is a plain attribute, not a submodule
                flag = graph.get_attr("training")
        node.args = (*node.args[:index], flag, *node.args[index + 1:])
    graph.lint()
    gm.recompile()
    return gm


def _expr(node: fx.Node) -> object:
    val = node.meta.get("val")
    return val.node.expr if isinstance(val, torch.SymInt) else None


def _nearest_dims(node: fx.Node, limit: int = 256) -> dict[object, tuple[fx.Node, int]]:
    """Symbolic size expression -> (tensor, dim) of the nearest tensor ``node`` is computed from that has
    a dim of that size (breadth-first over the tensors it reads, at most ``limit`` tensors)."""
    def tensors(n: fx.Node) -> list[fx.Node]:  # inputs holding a tensor or a list of them (split)
        return [a for a in n.all_input_nodes if isinstance(a.meta.get("val"), (torch.Tensor, list, tuple))]

    found: dict[object, tuple[fx.Node, int]] = {}
    queue, seen = tensors(node), set()
    while queue and len(seen) < limit:
        t = queue.pop(0)
        if t in seen:
            continue
        seen.add(t)
        for d, size in enumerate(t.meta["val"].shape if isinstance(t.meta["val"], torch.Tensor) else ()):
            if isinstance(size, torch.SymInt) and not size.node.expr.is_number:
                found.setdefault(size.node.expr, (t, d))
        queue += tensors(t)
    return found


def anchor_sizes(graph: fx.Graph) -> None:
    """Read every size an op uses from the nearest tensor that has it.

    torch.export writes every size as an expression of the *model input's* dims (``(H - 1) // 16 + 1``),
    which stays true only while the strides between the input and the op stay the teacher's. A student
    changes those strides, so a ``reshape(B, C, h, w)`` back to a map must read ``h`` and ``w`` from the
    map it reshapes. Each size argument (or part of one) whose expression equals a dim of a tensor the op
    is computed from becomes ``sym_size`` of the nearest such tensor: the same value in the teacher, the
    local value after a rewrite.
    """
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        args = [a for a in node.all_input_nodes if _expr(a) is not None]
        if not args:
            continue
        dims, made = _nearest_dims(node), {}
        replace = {a: _local_size(graph, node, a, dims, made) for a in args}
        if any(v is not k for k, v in replace.items()):
            node.args, node.kwargs = fx.map_arg((node.args, node.kwargs), lambda a, r=replace: r.get(a, a))
    graph.eliminate_dead_code()


def _local_size(graph: fx.Graph, user: fx.Node, s: fx.Node, dims: dict[object, tuple[fx.Node, int]],
                made: dict[fx.Node, fx.Node]) -> fx.Node:
    """``s`` (a size expression ``user`` reads) rebuilt from the nearest tensors' sizes (:func:`anchor_sizes`)."""
    if s in made:
        return made[s]
    new, anchor = s, dims.get(_expr(s))
    if anchor is not None and not (s.target is _ATEN.sym_size.int and s.args == anchor):
        with graph.inserting_before(user):
            new = graph.call_function(_ATEN.sym_size.int, anchor)
        new.meta["val"] = s.meta["val"]
    elif anchor is None and s.op == "call_function":
        inner = {a: _local_size(graph, user, a, dims, made) for a in s.all_input_nodes if _expr(a) is not None}
        if any(v is not k for k, v in inner.items()):
            with graph.inserting_before(user):
                new = graph.node_copy(s, lambda a: inner.get(a, a))
    made[s] = new
    return new


def rewritable_graph(
    model: nn.Module, inputs: Sequence[torch.Tensor], symbolic: bool = False
) -> tuple[fx.GraphModule, str]:
    """``(graph module, "fx" | "export")`` for ``model`` (module docstring); :class:`MemplanError` when
    neither works, naming both reasons."""
    try:
        return fx.GraphModule(model, fx.Tracer().trace(model), type(model).__name__), "fx"
    except Exception as e:  # noqa: BLE001 - any tracing failure triggers the export fallback
        fx_error = describe_error(e)
    try:
        return export_graph(model, inputs, symbolic), "export"
    except Exception as e:  # noqa: BLE001
        raise MemplanError(f"cannot capture {type(model).__name__} for rewriting: torch.fx failed ({fx_error}); "
                           f"torch.export failed ({describe_error(e)})") from e


def capture_rewritable(model: nn.Module, inputs: Sequence[torch.Tensor], symbolic: bool = False) -> CapturedGraph:
    """:func:`memplan.capture.capture` for fx-traceable models (module paths recorded by its tracer);
    else the exported graph of :func:`rewritable_graph` with shapes propagated on fake tensors."""
    try:
        return capture(model, inputs, method="fx")
    except MemplanError:
        pass
    gm, method = rewritable_graph(model, inputs, symbolic)
    return propagate(gm, inputs, method)


def propagate(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], method: str) -> CapturedGraph:
    """Shapes and storages of ``gm`` on fake copies of ``inputs`` (no re-tracing)."""
    logging.disable(logging.ERROR)  # fake tensors log the first attempt's failure at length
    try:
        kinds = StorageProp(gm).propagate(*inputs)
    except Exception:  # noqa: BLE001 - a graph exported on meta has meta-bound factory calls
        kinds = StorageProp(gm, on_cpu=False).propagate(*inputs)
    finally:
        logging.disable(logging.NOTSET)
    return CapturedGraph(gm=gm, method=method, input_shapes=[tuple(t.shape) for t in inputs], storage_kind=kinds,
                         model_name=gm.__class__.__name__)
