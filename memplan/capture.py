"""Capture: trace a model to a torch.fx graph and propagate shapes and storages on fake tensors.

``capture`` tries ``torch.fx.symbolic_trace`` first and falls back to ``torch.export`` (non-strict)
when tracing fails (for example on control flow that depends on the input's shape). Shapes are then
propagated by :class:`StorageProp`, an :class:`torch.fx.Interpreter` running on fake tensors, so a
1×3×2048×2048 input never allocates real activations. Every call node gets a typed
``node.meta["memplan"]`` (:class:`NodeMeta`) describing its tensor outputs and which storage each
one lives in; aliasing (views, in-place ops, getitem of tuples) falls out of storage identity.

Two dataflow facts are computed on the way (docs/definitions.md §1):

- **parameter-side**: a node whose tensor inputs are all parameters, buffers, constants or other
  parameter-side values (timm's weight standardisation, a constant ``torch.zeros``) is constant-
  folded by a runtime; its storages are parameter-side, never activations.
- **hidden temporaries**: every node runs under :class:`AtenRecorder`, which sees the aten calls it
  dispatches. A storage that one of those calls allocates from activation data and a later call of
  the same node reads, and that the node does not return, is invisible at this graph's level
  (``nn.MultiheadAttention``'s q/k/v and score tensors, ``nn.LSTM``'s gates, a ``matmul`` that
  copies a transposed operand). A node is a faithful leaf only when it has none ("runs one
  kernel"); ``capture(method="auto")`` then re-captures the whole model at the aten level
  (``make_fx`` on fake tensors, module paths kept from ``nn_module_stack``), where every call is
  one kernel.
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from memplan.errors import CaptureError, describe_error

META_KEY = "memplan"
# ops that read only the shape, dtype and device of their tensor argument: what they compute from it is
# parameter-side (a runtime builds it as a constant; Swin's attention mask from ``x.new_zeros``)
METADATA_READERS = frozenset({"new_zeros", "new_ones", "new_empty", "new_full", "zeros_like", "ones_like",
                              "empty_like", "full_like", "rand_like", "randn_like", "randint_like"})


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
    param_side: bool = False  # computed only from parameters/buffers/constants (docs/definitions.md §1)
    hidden_bytes: int = 0  # activation temporaries allocated and consumed inside the node, not returned


@dataclass
class CapturedGraph:
    """A traced model with :class:`NodeMeta` on every node.

    ``storage_kind`` maps each storage key to ``"input"``, ``"param"`` (parameters, buffers,
    constants reached through ``get_attr`` and parameter-side values) or ``"activation"``.
    ``param_side_bytes`` is the size of the storages parameter-side nodes compute (what a runtime
    folds into constants); ``opaque`` lists nodes with hidden temporaries (empty unless ``method``
    forced a level that cannot see inside them). An ``"aten"`` graph's constants are fake tensors:
    it is for analysis (structure, shapes, module paths), not for running.
    """

    gm: torch.fx.GraphModule
    method: str  # "fx", "export" or "aten"
    input_shapes: list[tuple[int, ...]]
    storage_kind: dict[int, str]
    model_name: str = ""
    param_side_bytes: int = 0
    opaque: list[str] = field(default_factory=list)


class AtenRecorder(TorchDispatchMode):
    """Watch the aten calls one graph node dispatches and find its hidden activation temporaries.

    :meth:`start` is given the storages of the node's activation inputs; every call whose tensor
    inputs touch activation data marks its new output storages as activation data. A storage that
    a call of the node allocated and a later call of it reads is a temporary; :meth:`hidden_bytes`
    sums those the node does not return. Unread by-products (max-pool indices) are not
    temporaries: nothing consumes them.

    Example:
        >>> import torch
        >>> rec = AtenRecorder()
        >>> x = torch.ones(4, 4)
        >>> with rec:
        ...     rec.start([x])
        ...     y = (x * 2).exp()  # x * 2 is allocated and consumed inside
        >>> rec.hidden_bytes([y])
        64
    """

    def __init__(self) -> None:
        super().__init__()
        self._act: set[StorageWeakRef] = set()
        self._created: dict[StorageWeakRef, int] = {}
        self._consumed: set[StorageWeakRef] = set()

    def start(self, activation_inputs: Sequence[torch.Tensor]) -> None:
        """Begin a node whose activation inputs are ``activation_inputs``."""
        self._act = {StorageWeakRef(t.untyped_storage()) for t in activation_inputs}
        self._created, self._consumed = {}, set()

    def hidden_bytes(self, outputs: Sequence[torch.Tensor]) -> int:
        """Bytes of the temporaries of the node begun last that are not among ``outputs``."""
        returned = {StorageWeakRef(t.untyped_storage()) for t in outputs}
        return sum(self._created[r] for r in self._consumed - returned)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        ins = [StorageWeakRef(t.untyped_storage()) for t in pytree.tree_leaves((args, kwargs or {}))
               if isinstance(t, torch.Tensor)]
        out = func(*args, **(kwargs or {}))
        from_act = any(r in self._act for r in ins)
        self._consumed.update(r for r in ins if r in self._created and r in self._act)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                r = StorageWeakRef(t.untyped_storage())
                if r not in self._created and r not in ins:
                    self._created[r] = int(t.untyped_storage().nbytes())
                if from_act:
                    self._act.add(r)
        return out


class StorageProp(torch.fx.Interpreter):
    """Run a GraphModule on fake tensors, recording shapes and storage identity per node.

    Example:
        >>> import torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()))
        >>> kinds = StorageProp(gm).propagate(torch.empty(1, 3, 32, 32, device="meta"))
        >>> gm.graph.find_nodes(op="call_module", target="0")[0].meta["memplan"].outputs[0].shape
        (1, 8, 30, 30)
    """

    def __init__(self, gm: torch.fx.GraphModule, fake_mode: FakeTensorMode | None = None,
                 on_cpu: bool = True) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.fake_mode = fake_mode or FakeTensorMode(allow_non_fake_inputs=True)
        self.on_cpu = on_cpu
        self._keys: dict[StorageWeakRef, int] = {}
        self._keep: list[torch.Tensor] = []  # keeps storages alive so weak refs are never reused
        self.storage_kind: dict[int, str] = {}
        self.param_side_bytes = 0
        self._param_nodes: dict[int, list[torch.fx.Node]] = {}  # storage -> param-side nodes showing it
        self._activated: set[int] = set()
        self._module_types = {name: type(m).__name__ for name, m in gm.named_modules()}
        self._recorder = AtenRecorder()
        self._cpu_constants: dict[str, torch.Tensor] = {}

    def _key(self, t: torch.Tensor, kind: str) -> int:
        ref = StorageWeakRef(t.untyped_storage())
        if ref not in self._keys:
            self._keys[ref] = len(self._keys)
            self.storage_kind[self._keys[ref]] = kind
            self._keep.append(t)
        return self._keys[ref]

    def propagate(self, *inputs: torch.Tensor) -> dict[int, str]:
        """Run on fake copies of ``inputs`` (real or meta tensors); return the storage kinds.

        With ``on_cpu`` the parameters are swapped for fake CPU tensors, so a model built on the
        meta device dispatches the kernels CPU PyTorch runs (meta decomposes some, e.g. ``silu_``).
        """
        device = torch.device("cpu") if self.on_cpu else device_of(self.module)
        with self.fake_mode:
            fakes = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in inputs]
        swap = fake_cpu_state(self.module, self.fake_mode) if self.on_cpu else contextlib.nullcontext()
        with swap, inference(), self.fake_mode, self._recorder:
            self.run(*fakes)
        return self.storage_kind

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        """Parameters as fake tensors (memoised), so views of them share one storage key."""
        value = super().get_attr(target, args, kwargs)
        if not isinstance(value, torch.Tensor):
            return value
        if self.on_cpu and value.device.type == "meta":  # a constant fake_cpu_state does not swap
            if target not in self._cpu_constants:
                with self.fake_mode:
                    self._cpu_constants[target] = torch.empty_strided(value.shape, value.stride(),
                                                                      dtype=value.dtype, device="cpu")
            return self._cpu_constants[target]
        return self.fake_mode.from_tensor(value)

    def run_node(self, n: torch.fx.Node) -> Any:
        args = [a for a in pytree.tree_leaves((n.args, n.kwargs)) if isinstance(a, torch.fx.Node)]
        before = [(t, t._version) for a in args for t in pytree.tree_leaves(self.env[a])
                  if isinstance(t, torch.Tensor)]
        # parameter-side: no tensor input carries activation data (nodes without tensor outputs,
        # such as x.size(0), carry shapes only, which are static for a runtime)
        shape_only = n.op in _CALLS and target_name(n, self.module).rstrip("_") in METADATA_READERS
        act_args = [a for a in args if not _meta(a).param_side and _meta(a).outputs and not shape_only]
        param_side = n.op == "get_attr" or (n.op in _CALLS and not act_args)
        self._recorder.start([t for a in act_args for t in pytree.tree_leaves(self.env[a])
                              if isinstance(t, torch.Tensor)])
        result = super().run_node(n)
        tensors = [t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
        mutated = {self._key(t, "activation") for t, v in before if t._version != v}
        kind = "param" if param_side else {"placeholder": "input"}.get(n.op, "activation")
        fresh = {StorageWeakRef(t.untyped_storage()) for t in tensors} - self._keys.keys()
        outs = [
            TensorMeta(
                shape=tuple(int(s) for s in t.shape),
                dtype=t.dtype,
                nbytes=t.numel() * t.element_size(),
                storage=self._key(t, kind),
                storage_nbytes=int(t.untyped_storage().nbytes()),
            )
            for t in tensors
        ]
        if param_side and any(tm.storage in self._activated for tm in outs):
            param_side = False  # a constant the program already wrote activation data into
        if param_side and n.op != "get_attr":
            self.param_side_bytes += sum(int(t.untyped_storage().nbytes()) for t in
                                         {StorageWeakRef(t.untyped_storage()): t for t in tensors
                                          if StorageWeakRef(t.untyped_storage()) in fresh}.values())
        if param_side:
            for tm in outs:
                self._param_nodes.setdefault(tm.storage, []).append(n)
        for key in mutated if not param_side else ():
            self._activate(key)
        module, cls = _module_path(n)
        n.meta[META_KEY] = NodeMeta(outputs=outs, mutates=sorted(mutated), module=module,
                                    module_type=self._module_types.get(module, cls), param_side=param_side,
                                    hidden_bytes=0 if param_side else self._recorder.hidden_bytes(tensors))
        return result


    def _activate(self, key: int) -> None:
        """A constant that activation data is written into (``out = zeros(..); out[:, :3] = x``; fx
        hoists the ``zeros`` to a ``get_attr``) is an activation from where it first appears."""
        nodes = self._param_nodes.pop(key, [])
        if not nodes:
            return
        self.storage_kind[key] = "activation"
        self._activated.add(key)
        if nodes[0].op != "get_attr":  # a computed value (a get_attr constant was never counted)
            self.param_side_bytes -= next(tm.storage_nbytes for tm in _meta(nodes[0]).outputs if tm.storage == key)
        for node in nodes:
            _meta(node).param_side = False


_CALLS = ("call_module", "call_function", "call_method")


def _meta(n: torch.fx.Node) -> NodeMeta:
    return n.meta.get(META_KEY) or NodeMeta()


def _module_path(n: torch.fx.Node) -> tuple[str, str]:
    """Dotted path and class name of the innermost module that ran ``n`` ("" at top level)."""
    if n.op == "call_module":
        return str(n.target), ""
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    cls = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
    return ("", "") if path in ("", "L['self']") else (str(path), cls)


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


METHODS = ("auto", "fx", "export", "aten")


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
    ``method`` is ``"auto"``, ``"fx"``, ``"export"`` or ``"aten"``. ``auto`` takes torch.fx's graph
    (torch.export's when fx cannot trace) if every node in it is one kernel, and otherwise (or when
    both fail) the aten-level graph, which sees inside every module (see the module docstring). ``fx`` and
    ``export`` keep their graph even when it has opaque nodes (listed in ``CapturedGraph.opaque``).
    Raises :class:`CaptureError` naming the module and the reason when nothing works.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
        >>> cg = capture(net, torch.empty(1, 3, 2048, 2048, device="meta"))
        >>> cg.method, [n.meta["memplan"].outputs[0].shape for n in cg.gm.graph.nodes if n.op == "call_module"]
        ('fx', [(1, 8, 2046, 2046)])
        >>> capture(torch.nn.LSTM(8, 8), torch.empty(5, 1, 8)).method  # its gates are seen at aten level
        'aten'
    """
    inputs = [example_inputs] if isinstance(example_inputs, torch.Tensor) else list(example_inputs)
    name = type(model).__name__
    if method not in METHODS:
        raise CaptureError(f"unknown capture method '{method}' (use {', '.join(METHODS)})")
    errors = []
    cg = None
    if method in ("auto", "fx"):
        tracer = _PathTracer(leaf_modules)
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
            gm = torch.fx.GraphModule(tracer.root, graph, name)
            cg = _propagate(gm, "fx", inputs, name)
        except Exception as e:  # noqa: BLE001 - any tracing failure triggers the fallback
            where = tracer.path_stack[-1] if tracer.path_stack else ""
            errors.append(f"torch.fx failed in {name}{'.' + where if where else ''} ({_short(e)})")
    if cg is None and method in ("auto", "export"):
        try:
            real = [torch.zeros(t.shape, dtype=t.dtype, device=device_of(model)) for t in inputs]
            with _quiet():
                ep = torch.export.export(model, tuple(real), strict=False)
            cg = _propagate(ep.module(), "export", inputs, name)
        except Exception as e:  # noqa: BLE001
            errors.append(f"torch.export failed ({_short(e)})")
    if method == "aten" or (method == "auto" and (cg is None or cg.opaque)):
        try:
            gm, fake_mode = _aten_graph(model, inputs)
            return _propagate(gm, "aten", inputs, name, fake_mode)
        except Exception as e:  # noqa: BLE001
            if cg is None:
                errors.append(f"aten-level capture failed ({_short(e)})")
            else:
                warnings.warn(f"{name}: aten-level capture failed ({_short(e)}); the {cg.method} "
                              f"graph misses temporaries inside {', '.join(cg.opaque[:3])}", stacklevel=2)
    if cg is not None:
        return cg
    raise CaptureError(f"cannot capture model {name}: " + "; ".join(errors))


def _short(e: BaseException, limit: int = 240) -> str:
    """:func:`describe_error`, cut to ``limit`` characters (tracers put whole expressions in line one)."""
    text = describe_error(e)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence tracers that print whole graphs on failure (we raise one line)."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _aten_graph(model: nn.Module, inputs: list[torch.Tensor]) -> tuple[torch.fx.GraphModule, FakeTensorMode]:
    """The model's aten-level graph (``make_fx`` on fake CPU tensors), nodes tagged with their module.

    The parameters become the graph's constants, fake tensors of the returned mode.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        fakes = [torch.empty(t.shape, dtype=t.dtype, device="cpu") for t in inputs]

    def forward(*args: torch.Tensor) -> Any:
        return model(*args)

    forward._orig_mod = model  # type: ignore[attr-defined] # make_fx records nn_module_stack from it
    with _quiet(), fake_cpu_state(model, fake_mode), inference():
        gm = make_fx(forward, tracing_mode="fake", record_module_stack=True, _allow_non_fake_inputs=True)(*fakes)
    return gm, fake_mode


@contextlib.contextmanager
def inference() -> Any:
    """Run as inference does, and as the code is written (docs/definitions.md §1).

    No autograd (it would clone the inputs of in-place ops it must differentiate) and no
    ``nn.MultiheadAttention``/``TransformerEncoderLayer`` fused fast path (one opaque kernel that
    replaces the modules' written code).
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


@contextlib.contextmanager
def fake_cpu_state(model: nn.Module, fake_mode: FakeTensorMode) -> Any:
    """Swap ``model``'s parameters and buffers for fake CPU tensors of ``fake_mode`` (same shapes)."""
    from torch.nn.utils.stateless import _reparametrize_module

    with fake_mode:
        state = {k: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="cpu")
                 for k, v in [*model.named_parameters(), *model.named_buffers()]}
    with _reparametrize_module(model, state, tie_weights=True):
        yield


def device_of(model: nn.Module) -> torch.device:
    t = next(iter(model.parameters()), None)
    t = next(iter(model.buffers()), None) if t is None else t
    return t.device if t is not None else torch.device("cpu")


def _propagate(gm: torch.fx.GraphModule, method: str, inputs: list[torch.Tensor], name: str,
               fake_mode: FakeTensorMode | None = None) -> CapturedGraph:
    prop = StorageProp(gm, fake_mode)
    try:
        kinds = prop.propagate(*inputs)
    except Exception:  # noqa: BLE001 - a model that cannot run on CPU tensors (device-bound constants)
        if fake_mode is not None:
            raise
        prop = StorageProp(gm, on_cpu=False)
        kinds = prop.propagate(*inputs)
    _drop_dead_effects(gm)
    opaque = [n.name for n in gm.graph.nodes if _meta(n).hidden_bytes > 0]
    return CapturedGraph(
        gm=gm,
        method=method,
        input_shapes=[tuple(t.shape) for t in inputs],
        storage_kind=kinds,
        model_name=name,
        param_side_bytes=prop.param_side_bytes,
        opaque=opaque,
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
