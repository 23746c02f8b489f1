"""Analyze: the peak activation memory of a model, where it happens and what is live there."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from memplan.capture import capture
from memplan.errors import MemplanError
from memplan.graph import DTYPES, MemGraph, build_graph
from memplan.liveness import Lifetime, lifetimes, live_bytes

JSON_KEYS = (
    "model", "input_shape", "form", "dtype", "peak_bytes", "peak_node", "live_at_peak", "timeline",
    "input_bytes", "param_bytes", "param_side_bytes", "activation_sum_bytes",
)


@dataclass
class LiveTensor:
    """A storage live at the peak step."""

    tensor: str  # producing op name, or "input"
    bytes: int
    shape: list[int]
    producer_module: str


@dataclass
class TimelineStep:
    """Live bytes while op ``node`` executes (step ``step`` of the order)."""

    step: int
    node: str
    op: str
    module: str
    live_bytes: int


@dataclass
class MemoryReport:
    """The result of :func:`analyze`. Byte counts are exact; KiB/MiB only when printed.

    ``extra`` holds what later stages add (arena plan, order search) and is merged into the JSON.
    """

    model: str
    input_shape: list[int]
    form: str
    dtype: str
    peak_bytes: int
    peak_node: str
    live_at_peak: list[LiveTensor]
    timeline: list[TimelineStep]
    input_bytes: int
    param_bytes: int
    activation_sum_bytes: int
    method: str = "fx"
    param_side_bytes: int = 0  # values computed from parameters only, folded by a runtime (§1)
    graph: MemGraph | None = field(default=None, repr=False)
    order: list[str] = field(default_factory=list, repr=False)
    lifetimes: list[Lifetime] = field(default_factory=list, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_step(self) -> int:
        """Index of the first step reaching the peak."""
        return next((t.step for t in self.timeline if t.live_bytes == self.peak_bytes), 0)

    def to_json(self) -> dict[str, Any]:
        """The JSON document ``memplan analyze --json`` writes."""
        d = {k: getattr(self, k) for k in JSON_KEYS}
        d["live_at_peak"] = [asdict(t) for t in self.live_at_peak]
        d["timeline"] = [asdict(t) for t in self.timeline]
        d.update(self.extra)
        return d


def report_from_graph(
    g: MemGraph, *, order: Sequence[str] | None = None, param_bytes: int = 0, model: str = "",
    param_side_bytes: int = 0,
) -> MemoryReport:
    """Compute the timeline, peak and live set of ``g`` under ``order`` (default program order).

    ``param_side_bytes``: storages computed only from parameters (docs/definitions.md §1), reported
    beside ``param_bytes`` and never live.
    """
    names = [o.name for o in g.ops] if order is None else list(order)
    lts = lifetimes(g, names)
    live = live_bytes(lts, len(names))
    by_name = {o.name: o for o in g.ops}
    timeline = [
        TimelineStep(i, n, by_name[n].op, by_name[n].module, b) for i, (n, b) in enumerate(zip(names, live))
    ]
    inputs = [st for st in g.storages.values() if st.is_input]
    if not timeline:
        raise MemplanError(f"model {model or g.model_name} executes no ops on its input")
    peak = max(live)
    step = live.index(peak)
    at_peak = sorted((lt for lt in lts if lt.start <= step <= lt.end), key=lambda lt: -lt.size)
    return MemoryReport(
        model=model or g.model_name,
        input_shape=list(g.input_shapes[0]) if g.input_shapes else [],
        form=g.form,
        dtype=g.dtype,
        peak_bytes=peak,
        peak_node=names[step],
        live_at_peak=[
            LiveTensor(
                tensor=g.storages[lt.storage].producer or "input",
                bytes=lt.size,
                shape=list(g.storages[lt.storage].shape),
                producer_module=g.storages[lt.storage].module,
            )
            for lt in at_peak
        ],
        timeline=timeline,
        input_bytes=sum(st.nbytes for st in inputs),
        param_bytes=param_bytes,
        activation_sum_bytes=sum(o.out_bytes for o in g.ops),
        method=g.method,
        param_side_bytes=param_side_bytes,
        graph=g,
        order=names,
        lifetimes=lts,
    )


def param_bytes_of(model: nn.Module, dtype: str = "float32") -> int:
    """Bytes of the model's parameters and buffers (each storage once), floats at ``dtype``."""
    itemsize = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * (itemsize if t.dtype.is_floating_point else t.element_size())
    return total


def analyze(
    model: nn.Module,
    inputs: Sequence[int] | torch.Tensor | Sequence[torch.Tensor] = (1, 3, 224, 224),
    *,
    form: str = "deploy",
    dtype: str = "float32",
    inplace_elementwise: bool = False,
    name: str = "",
    method: str = "auto",
    leaf_modules: Sequence[type[nn.Module] | str] = (),
) -> MemoryReport:
    """Peak activation memory of ``model`` in program order (docs/definitions.md §1).

    ``inputs`` is an input shape, a tensor or a list of tensors (only shapes/dtypes are used; the
    analysis runs on fake tensors). The model is put in eval mode for the analysis.

    Example:
        >>> from memplan.zoo import create_model
        >>> r = analyze(create_model("resnet18"), (1, 3, 224, 224))
        >>> r.peak_bytes, r.peak_node
        (4014080, 'maxpool')
    """
    if isinstance(inputs, torch.Tensor):
        example = [inputs]
    elif len(inputs) and all(isinstance(t, torch.Tensor) for t in inputs):
        example = list(inputs)
    else:
        shape = tuple(inputs)
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            raise MemplanError(f"bad input shape {shape}: need positive integers such as 1,3,224,224")
        example = [torch.empty(shape, device="meta")]
    was_training = model.training
    model.eval()
    try:
        cg = capture(model, example, method=method, leaf_modules=leaf_modules)
    finally:
        model.train(was_training)
    g = build_graph(cg, form=form, dtype=dtype, inplace_elementwise=inplace_elementwise)
    return report_from_graph(g, param_bytes=param_bytes_of(model, dtype), model=name or type(model).__name__,
                             param_side_bytes=cg.param_side_bytes)
