"""The rewritable graph of a model: torch.fx when it traces, else torch.export with symbolic sizes.

A student pass rewrites strides in a graph and then runs that graph at other resolutions and batch
sizes, so the graph must not bake sizes in. torch.fx keeps Python shape arithmetic symbolic; a model
it cannot trace (control flow on ``x.shape``, TF-style "same" padding computed with ``math.ceil``) is
exported with every input dim marked ``Dim.AUTO`` (an example batch of 2, so the batch stays symbolic
too): shape arithmetic stays in the graph as ``sym_size`` nodes and follows the new sizes.

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
    >>> method, gm(torch.zeros(5, 3, 17, 17)).shape
    ('export', torch.Size([5, 4, 9, 9]))
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

__all__ = ["MODE_ARGS", "capture_rewritable", "rewritable_graph"]

_ATEN = torch.ops.aten
MODE_ARGS: dict[object, int] = {  # exported op -> index of its "training" argument
    _ATEN.batch_norm.default: 5,
    _ATEN.dropout.default: 2,
    _ATEN.feature_dropout.default: 2,
    _ATEN.alpha_dropout.default: 2,
}


def _export(model: nn.Module, inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    from torch.export import Dim

    device = device_of(model)  # a meta model exports on meta examples (a sweep never allocates)
    examples = tuple(torch.zeros((max(2, t.shape[0]), *t.shape[1:]) if t.dim() else (), dtype=t.dtype,
                                 device=device) for t in inputs)
    dynamic = tuple({d: Dim.AUTO for d in range(t.dim())} for t in examples)
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ep = torch.export.export(copy.deepcopy(model).eval(), examples, dynamic_shapes=dynamic, strict=False)
    finally:
        logging.disable(logging.NOTSET)
    exported = ep.module()
    gm = fx.GraphModule(exported, exported.graph, type(model).__name__)
    graph = gm.graph
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


def rewritable_graph(model: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[fx.GraphModule, str]:
    """``(graph module, "fx" | "export")`` for ``model`` (module docstring); :class:`MemplanError` when
    neither works, naming both reasons."""
    try:
        return fx.GraphModule(model, fx.Tracer().trace(model), type(model).__name__), "fx"
    except Exception as e:  # noqa: BLE001 - any tracing failure triggers the export fallback
        fx_error = describe_error(e)
    try:
        return _export(model, inputs), "export"
    except Exception as e:  # noqa: BLE001
        raise MemplanError(f"cannot capture {type(model).__name__} for rewriting: torch.fx failed ({fx_error}); "
                           f"torch.export failed ({describe_error(e)})") from e


def capture_rewritable(model: nn.Module, inputs: Sequence[torch.Tensor]) -> CapturedGraph:
    """:func:`memplan.capture.capture` for fx-traceable models (module paths recorded by its tracer);
    else the exported graph of :func:`rewritable_graph` with shapes propagated on fake tensors."""
    try:
        return capture(model, inputs, method="fx")
    except MemplanError:
        pass
    gm, method = rewritable_graph(model, inputs)
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
