"""An independent aten-level reference for the as-written peak (docs/definitions.md §1).

:func:`aten_reference` runs the model eagerly on fake CPU tensors (no real memory; the
parameters are swapped for fake CPU tensors, so a meta-device model dispatches CPU kernels) under a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that
records every aten call: the storages its tensor inputs live in and the storages its outputs live
in. Every tensor is kept alive for the run, so storage identity is exact. Liveness is then pure
dataflow over the call sequence, with no graph, no tracer and no module boundaries: it sees inside
every module. It shares no analysis code with :mod:`memplan.capture` (only the run mode,
:func:`~memplan.capture.inference`), so agreement is evidence.

Conventions (the same as memplan's, docs/definitions.md §1):

- the input is live from the first call to its last reader; model outputs live to the end;
- a storage is live from the call that allocates it to the last call that reads it (through any
  view: views share the storage; in-place calls write into their input and allocate nothing);
- parameters, buffers, constants and every storage computed only from them are parameter-side:
  reported as ``param_side_bytes``, never live;
- an output that no call reads, of a call whose other outputs are used, is a by-product of the
  kernel choice (``max_pool2d_with_indices``'s indices, BatchNorm's saved statistics): reported
  as ``byproduct_bytes`` and not counted, because memplan's graphs do not ask for it.

Differences from memplan that remain by definition: aten-level calls are the kernels the CPU
dispatcher picks (an LSTM layer is one ``mkldnn_rnn_layer`` call, ``scaled_dot_product_attention``
one flash kernel; on meta both would be decomposed), and workspace inside one kernel is invisible
to both.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from memplan.capture import METADATA_READERS, inference
from memplan.errors import MemplanError, describe_error


@dataclass
class ReferenceResult:
    """The aten-level as-written peak and where it is first reached."""

    peak_bytes: int
    peak_call: str  # aten op at the peak, e.g. "aten.convolution.default"
    peak_index: int
    calls: int
    input_bytes: int
    param_side_bytes: int
    byproduct_bytes: int


@dataclass
class _Call:
    op: str
    reads: set[int]
    allocs: list[int]  # storages this call allocated from activation data


class _Recorder(TorchDispatchMode):
    """Record each aten call's input and output storages; classify new storages by dataflow."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[StorageWeakRef, int] = {}
        self.nbytes: dict[int, int] = {}
        self.activation: set[int] = set()
        self.param_side: set[int] = set()
        self.calls: list[_Call] = []
        self.keep: list[torch.Tensor] = []
        self.created_at: dict[int, int] = {}  # parameter-side storage -> index of the call that made it

    def sid(self, t: torch.Tensor) -> int:
        ref = StorageWeakRef(t.untyped_storage())
        if ref not in self.ids:
            self.ids[ref] = len(self.ids)
            self.nbytes[self.ids[ref]] = int(t.untyped_storage().nbytes())
            self.keep.append(t)
        return self.ids[ref]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        ins = {self.sid(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
               and func.__name__.split(".")[0] not in METADATA_READERS}
        known = set(self.nbytes)
        out = func(*args, **kwargs)
        from_act = bool(ins & self.activation)
        if from_act:  # activation data written into a computed constant: it is an activation
            for s in {self.sid(t) for t in _written(func, args, kwargs)} & self.param_side:
                self.param_side.discard(s)
                self.activation.add(s)
                self.calls[self.created_at[s]].allocs.append(s)
        allocs = []
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = self.sid(t)
                if s not in known and s not in allocs:
                    (self.activation if from_act else self.param_side).add(s)
                    if from_act:
                        allocs.append(s)
                    else:
                        self.created_at[s] = len(self.calls)
        self.calls.append(_Call(str(func), ins & self.activation, allocs))
        return out


def _written(func: Any, args: Any, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors an aten call writes, from its schema (``Tensor(a!)`` arguments)."""
    schema = getattr(func, "_schema", None)
    out = []
    for i, arg in enumerate(schema.arguments if schema is not None else ()):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            out += [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
    return out


def aten_reference(model: nn.Module, inputs: Sequence[torch.Tensor] | torch.Tensor) -> ReferenceResult:
    """As-written peak of ``model`` on ``inputs`` (only shapes/dtypes used) from its aten calls.

    The model runs in eval mode without autograd and without the attention fast path, as
    memplan's capture does (:func:`memplan.capture.inference`).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(2, 2, 1))
        >>> r = aten_reference(net, torch.empty(1, 1, 4, 4))
        >>> r.peak_bytes, r.peak_call  # conv1 out (128 B) + relu out (128 B)
        (256, 'aten.relu.default')
    """
    tensors = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    was_training = model.training
    model.eval()
    try:
        try:
            return _run(model, tensors, on_cpu=True)
        except Exception:  # noqa: BLE001 - device-bound constants: run where the parameters are
            return _run(model, tensors, on_cpu=False)
    except Exception as e:  # noqa: BLE001 - one line for the user
        raise MemplanError(f"aten reference: {type(model).__name__} does not run on fake tensors "
                           f"({describe_error(e)})") from e
    finally:
        model.train(was_training)


def _run(model: nn.Module, tensors: list[torch.Tensor], on_cpu: bool) -> ReferenceResult:
    """One recorded run on fake tensors: on the CPU (parameters swapped) or the parameters' device."""
    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = "cpu" if on_cpu or param is None else param.device
    rec = _Recorder()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fakes = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in tensors]
        for f in fakes:
            rec.activation.add(rec.sid(f))
        state = {k: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device)
                 if on_cpu else mode.from_tensor(v)
            for k, v in itertools.chain(model.named_parameters(), model.named_buffers())}
        for v in state.values():
            rec.sid(v)
        with inference(), rec:
            out = torch.func.functional_call(model, state, tuple(fakes), tie_weights=True)
    return _liveness(rec, [rec.sid(f) for f in fakes],
                     {rec.sid(t) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)})


def _liveness(rec: _Recorder, inputs: list[int], outputs: set[int]) -> ReferenceResult:
    calls = rec.calls
    if not calls:
        raise MemplanError("aten reference: the model executes no aten calls")
    last = len(calls) - 1
    used = {s for c in calls for s in c.reads} | outputs
    start = dict.fromkeys(inputs, 0)
    byproduct = 0
    for i, c in enumerate(calls):
        dropped = [s for s in c.allocs if s not in used] if any(s in used for s in c.allocs) else []
        byproduct += sum(rec.nbytes[s] for s in dropped)
        start.update((s, i) for s in c.allocs if s not in dropped)
    end = dict(start)
    for i, c in enumerate(calls):
        for s in c.reads:
            if s in end:
                end[s] = max(end[s], i)
    for s in outputs:
        if s in end:
            end[s] = last
    diff = [0] * (len(calls) + 1)
    for s, b in start.items():
        diff[b] += rec.nbytes[s]
        diff[end[s] + 1] -= rec.nbytes[s]
    live, acc = [], 0
    for d in diff[:-1]:
        acc += d
        live.append(acc)
    peak = max(live)
    idx = live.index(peak)
    return ReferenceResult(
        peak_bytes=peak, peak_call=calls[idx].op, peak_index=idx, calls=len(calls),
        input_bytes=sum(rec.nbytes[s] for s in inputs),
        param_side_bytes=sum(rec.nbytes[s] for s in rec.param_side),
        byproduct_bytes=byproduct,
    )
