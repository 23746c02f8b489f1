"""Capture: trace a model to a torch.fx graph and propagate shapes and storages on fake tensors.

``capture`` tries ``torch.fx.symbolic_trace`` first and falls back to ``torch.export`` (non-strict)
when tracing fails (for example on control flow that depends on the input's shape). Shapes are then
propagated by :class:`StorageProp`, an :class:`torch.fx.Interpreter` running on fake tensors, so a
1×3×2048×2048 input never allocates real activations. Every call node gets a typed
``node.meta["memplan"]`` (:class:`NodeMeta`) describing its tensor outputs and which storage each
one lives in; aliasing (views, in-place ops, getitem of tuples) falls out of storage identity.
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

from memplan.errors import CaptureError, describe_error

META_KEY = "memplan"


@dataclass(frozen=True)
class TensorMeta:
    """One tensor output of a node: its shape, dtype and the storage it lives in."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int  # bytes of this tensor's own elements (numel * itemsize)
    storage: int  # storage key, shared by aliases
    storage_nbytes: int


@dataclass
class NodeMeta:
    """What :class:`StorageProp` writes into ``node.meta["memplan"]``."""

    outputs: list[TensorMeta] = field(default_factory=list)
    mutates: list[int] = field(default_factory=list)  # storages written in place (version bumped)
    module: str = ""  # dotted path of the innermost module that ran this node ("" = top level)
    module_type: str = ""


@dataclass
class CapturedGraph:
    """A traced model with :class:`NodeMeta` on every node.

    ``storage_kind`` maps each storage key to ``"input"``, ``"param"`` (parameters, buffers and
    constants reached through ``get_attr``) or ``"activation"``.
    """

    gm: torch.fx.GraphModule
    method: str  # "fx" or "export"
    input_shapes: list[tuple[int, ...]]
    storage_kind: dict[int, str]
    model_name: str = ""


class StorageProp(torch.fx.Interpreter):
    """Run a GraphModule on fake tensors, recording shapes and storage identity per node.

    Example:
        >>> import torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()))
        >>> kinds = StorageProp(gm).propagate(torch.empty(1, 3, 32, 32, device="meta"))
        >>> gm.graph.find_nodes(op="call_module", target="0")[0].meta["memplan"].outputs[0].shape
        (1, 8, 30, 30)
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self._keys: dict[StorageWeakRef, int] = {}
        self._keep: list[torch.Tensor] = []  # keeps storages alive so weak refs are never reused
        self.storage_kind: dict[int, str] = {}
        self._module_types = {name: type(m).__name__ for name, m in gm.named_modules()}

    def _key(self, t: torch.Tensor, kind: str) -> int:
        ref = StorageWeakRef(t.untyped_storage())
        if ref not in self._keys:
            self._keys[ref] = len(self._keys)
            self.storage_kind[self._keys[ref]] = kind
            self._keep.append(t)
        return self._keys[ref]

    def propagate(self, *inputs: torch.Tensor) -> dict[int, str]:
        """Run on fake copies of ``inputs`` (real or meta tensors); return the storage kinds."""
        params = list(self.module.parameters())
        device = params[0].device if params else torch.device("cpu")
        with self.fake_mode:
            fakes = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in inputs]
        with self.fake_mode:
            self.run(*fakes)
        return self.storage_kind

    def run_node(self, n: torch.fx.Node) -> Any:
        args = [a for a in pytree.tree_leaves((n.args, n.kwargs)) if isinstance(a, torch.fx.Node)]
        before = [(t, t._version) for a in args for t in pytree.tree_leaves(self.env[a])
                  if isinstance(t, torch.Tensor)]
        result = super().run_node(n)
        mutated = {self._key(t, "activation") for t, v in before if t._version != v}
        kind = {"placeholder": "input", "get_attr": "param"}.get(n.op, "activation")
        outs = []
        for t in pytree.tree_leaves(result):
            if isinstance(t, torch.Tensor):
                outs.append(
                    TensorMeta(
                        shape=tuple(int(s) for s in t.shape),
                        dtype=t.dtype,
                        nbytes=t.numel() * t.element_size(),
                        storage=self._key(t, kind),
                        storage_nbytes=int(t.untyped_storage().nbytes()),
                    )
                )
        module = _module_path(n)
        n.meta[META_KEY] = NodeMeta(outputs=outs, mutates=sorted(mutated), module=module,
                                    module_type=self._module_types.get(module, ""))
        return result


def _module_path(n: torch.fx.Node) -> str:
    if n.op == "call_module":
        return str(n.target)
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return "" if path in ("", "L['self']") else str(path)


class _PathTracer(torch.fx.Tracer):
    """A Tracer with configurable leaf modules that remembers where tracing failed."""

    def __init__(self, leaf_modules: Sequence[type[nn.Module] | str]) -> None:
        super().__init__()
        self.leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self.leaf_names = {t for t in leaf_modules if isinstance(t, str)}
        self.path_stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self.path_stack.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.path_stack.pop()
        return out


def _drop_dead_effects(gm: torch.fx.GraphModule) -> None:
    """Remove nodes without users whose outputs hold no tensors (torch.export's guard calls)."""
    for n in list(gm.graph.nodes):
        if n.op in ("call_module", "call_function") and not n.users:
            meta = n.meta.get(META_KEY)
            if meta is not None and not meta.outputs:
                gm.graph.erase_node(n)
    gm.recompile()


def capture(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    method: str = "auto",
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> CapturedGraph:
    """Trace ``model`` and propagate shapes/storages on fake tensors.

    ``example_inputs`` may be real, meta or fake tensors; only their shapes and dtypes are used.
    ``method`` is ``"auto"`` (fx, then export), ``"fx"`` or ``"export"``. Raises
    :class:`CaptureError` naming the module and the reason when nothing works.

    Example:
        >>> import torch
        >>> cg = capture(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), torch.empty(1, 3, 2048, 2048, device="meta"))
        >>> cg.method, [n.meta["memplan"].outputs[0].shape for n in cg.gm.graph.nodes if n.op == "call_module"]
        ('fx', [(1, 8, 2046, 2046)])
    """
    inputs = [example_inputs] if isinstance(example_inputs, torch.Tensor) else list(example_inputs)
    name = type(model).__name__
    if method not in ("auto", "fx", "export"):
        raise CaptureError(f"unknown capture method '{method}' (use auto, fx or export)")
    errors = []
    if method in ("auto", "fx"):
        tracer = _PathTracer(leaf_modules)
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
            gm = torch.fx.GraphModule(tracer.root, graph, name)
            return _propagate(gm, "fx", inputs, name)
        except Exception as e:  # noqa: BLE001 - any tracing failure triggers the fallback
            where = tracer.path_stack[-1] if tracer.path_stack else ""
            errors.append(f"torch.fx failed in {name}{'.' + where if where else ''} ({describe_error(e)})")
    if method in ("auto", "export"):
        try:
            real = [torch.zeros(t.shape, dtype=t.dtype) for t in inputs]
            logging.disable(logging.WARNING)  # export prints whole graphs on failure; we raise one line
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    ep = torch.export.export(model, tuple(real), strict=False)
            finally:
                logging.disable(logging.NOTSET)
            gm = ep.module()
            return _propagate(gm, "export", inputs, name)
        except Exception as e:  # noqa: BLE001
            errors.append(f"torch.export failed ({describe_error(e)})")
    raise CaptureError(f"cannot capture model {name}: " + "; ".join(errors))


def _propagate(gm: torch.fx.GraphModule, method: str, inputs: list[torch.Tensor], name: str) -> CapturedGraph:
    prop = StorageProp(gm)
    kinds = prop.propagate(*inputs)
    _drop_dead_effects(gm)
    return CapturedGraph(
        gm=gm,
        method=method,
        input_shapes=[tuple(t.shape) for t in inputs],
        storage_kind=kinds,
        model_name=name,
    )


def target_name(n: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    """A readable, normalised op name: module class for call_module, function/ATen name otherwise.

    In-place variants keep their trailing underscore (``relu_``); ``operator.iadd`` reads ``iadd``.
    """
    if n.op == "call_module":
        return type(gm.get_submodule(str(n.target))).__name__
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    if isinstance(t, str):
        return t
    if t is operator.getitem:
        return "getitem"
    return getattr(t, "__name__", str(t))
