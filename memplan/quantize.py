"""Static int8 quantization of an exported ONNX model with onnxruntime's quantization tools.

:func:`quantize_onnx` runs onnxruntime's pre-processing (shape inference and graph optimization),
then ``quantize_static`` in QDQ format with per-channel int8 weights and uint8 activations
calibrated (MinMax by default) on real samples, and checks the result against the fp32 model on
held-out samples: top-1 agreement of the two models' argmax and the max |Δ| of the dequantized
outputs (absolute, and relative to the fp32 output's largest magnitude). The file is written
atomically.

With ``integer_input`` the model takes the quantized image itself (uint8, as a camera or an int8
runtime delivers it): the input's QuantizeLinear is removed, its scale and zero point are recorded in
the file's metadata (``memplan.input_scale``, ``memplan.input_zero_point``) and in the result, and the
parity check feeds the check samples quantized that way. The resident input then takes one byte
per pixel instead of four.

Example:
    >>> import tempfile, numpy as np, torch
    >>> from memplan.export import export_onnx
    >>> from memplan.zoo import create_model
    >>> d = tempfile.mkdtemp()
    >>> _ = export_onnx(create_model("resnet_tiny"), torch.zeros(1, 1, 28, 28), f"{d}/fp32.onnx")
    >>> calib = np.random.default_rng(0).standard_normal((24, 1, 28, 28)).astype(np.float32)
    >>> q = quantize_onnx(f"{d}/fp32.onnx", f"{d}/int8.onnx", calib[:16], calib[16:])
    >>> q.samples, q.format, 0.0 <= q.top1_agreement <= 1.0
    (8, 'QDQ', True)
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memplan.errors import MemplanError, describe_error
from memplan.io import check_destination, publish

__all__ = ["QuantizeResult", "make_integer_input", "quantize_input", "quantize_onnx", "restore_order"]


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize_onnx` wrote and how close the int8 model stays to the fp32 one."""

    path: str
    format: str
    calibration_samples: int
    calibration_method: str
    samples: int  # held-out samples of the parity check
    top1_agreement: float  # fraction of samples whose argmax agrees
    max_abs_diff: float
    max_rel_diff: float  # max |Δ| / max |fp32 output|
    fp32_bytes: int
    int8_bytes: int
    input_scale: float | None = None  # integer input: x_uint8 = clip(round(x / scale) + zero_point, 0, 255)
    input_zero_point: int | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)

    def summary(self) -> str:
        """One line for the CLI."""
        return (f"wrote {self.path} (int8 {self.format}, per-channel weights, {self.calibration_samples} calibration "
                f"samples, {self.calibration_method}); on {self.samples} held-out samples: top-1 agreement "
                f"{100 * self.top1_agreement:.2f}%, max |Δ| {self.max_abs_diff:.4g} ({100 * self.max_rel_diff:.2f}% of "
                f"the output scale); file {self.int8_bytes:,} B vs fp32 {self.fp32_bytes:,} B"
                + (f"; input uint8, x_q = round(x / {self.input_scale:.6g}) + {self.input_zero_point}"
                   if self.input_scale is not None else ""))


def _batches(samples: np.ndarray, name: str) -> Iterator[dict[str, np.ndarray]]:
    for i in range(len(samples)):
        yield {name: samples[i : i + 1]}


def _outputs(path: str, samples: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, feed)[0].reshape(1, -1) for feed in _batches(samples, name)])


def quantize_input(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """An image as an integer-input model takes it (onnx QuantizeLinear, uint8, round half to even)."""
    return np.clip(np.rint(x / np.float32(scale)) + zero_point, 0, 255).astype(np.uint8)


# ops that only move or regroup elements: they run on the uint8 image as on the float one
_MOVES = {"Slice", "Split", "Concat", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


def _moved_input(g: Any) -> tuple[list[Any], set[str], list[Any]]:
    """The nodes that only move the input's elements (:data:`_MOVES`), the tensors they and the input
    make, and the other nodes reading those tensors."""
    readers: dict[str, list[Any]] = {}
    for n in g.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    moves: dict[int, Any] = {}
    ends: dict[int, Any] = {}
    todo, seen = [g.input[0].name], {g.input[0].name}
    while todo:
        for n in readers.get(todo.pop(), []):
            data = n.input if n.op_type == "Concat" else n.input[:1]
            if n.op_type in _MOVES and all(t in seen for t in data):
                if id(n) not in moves:
                    moves[id(n)] = n
                    fresh = [t for t in n.output if t not in seen]
                    seen.update(fresh)
                    todo.extend(fresh)
            else:
                ends[id(n)] = n  # a Concat whose other inputs are not moved yet is dropped below
    return list(moves.values()), seen, [n for k, n in ends.items() if k not in moves]


def make_integer_input(model: Any) -> tuple[float, int]:
    """Make ``model`` (a QDQ onnx ModelProto, in place) take its input quantized: drop the
    QuantizeLinear nodes that quantize the input, give the input its uint8 type and record scale and
    zero point in the metadata.

    Between the input and its QuantizeLinears only ops that move elements may run (a patched model
    slices the float image first; :data:`_MOVES`), and every such QuantizeLinear must use the same
    constant per-tensor uint8 scale and zero point; otherwise a one-line :class:`MemplanError` says why.
    """
    from onnx import TensorProto, numpy_helper

    g = model.graph
    x = g.input[0]
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(a.t) for n in g.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    moves, _, ends = _moved_input(g)
    quantizes = [n for n in ends if n.op_type == "QuantizeLinear"]
    for n in ends:
        if n.op_type != "QuantizeLinear":
            raise MemplanError(f"cannot give '{x.name}' an integer input: its values reach {n.op_type} "
                               f"'{n.name}' before any QuantizeLinear")
    params = {(q.input[1], q.input[2]) if len(q.input) >= 3 else (q.input[1], "") for q in quantizes}
    if not quantizes or any(s not in consts or z not in consts for s, z in params):
        raise MemplanError(f"cannot give '{x.name}' an integer input: it is not quantized by constant parameters")
    values = {(float(consts[s].item()) if consts[s].size == 1 else None, consts[z].dtype.name,
               int(consts[z].item()) if consts[z].size == 1 else None) for s, z in params}
    if len(values) != 1 or None in next(iter(values)) or next(iter(values))[1] != "uint8":
        raise MemplanError(f"cannot give '{x.name}' an integer input: its quantization is not one per-tensor "
                           "uint8 scale and zero point")
    scale, _, zero = next(iter(values))
    rename = {q.output[0]: q.input[0] for q in quantizes}
    for n in g.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
    for q in quantizes:
        g.node.remove(q)
    x.type.tensor_type.elem_type = TensorProto.UINT8
    moved = {t for n in moves for t in n.output}
    kept = [v for v in g.value_info if v.name not in moved]  # their type is now uint8: inferred again
    del g.value_info[:]
    g.value_info.extend(kept)
    meta = {p.key: p for p in model.metadata_props}
    for key, value in (("memplan.input_scale", repr(scale)), ("memplan.input_zero_point", str(zero))):
        (meta[key] if key in meta else model.metadata_props.add(key=key)).value = value
    return scale, zero


def restore_order(quantized: Any, source: Any) -> None:
    """Put the nodes of ``quantized`` (an onnx ModelProto, in place) back in the order of its fp32
    ``source``: onnxruntime's pre-processing saves its own topological order, which interleaves
    independent branches (a patched model's patches run breadth-first, all live at once).

    Each node that kept its source name takes the source's position; a QuantizeLinear follows its
    producer, a DequantizeLinear (and anything else new) precedes its first consumer. A stable
    topological sort on those keys gives the new order. A file whose nodes mostly lost their
    source names keeps onnxruntime's order.
    """
    import heapq

    nodes = list(quantized.graph.node)  # onnxruntime saves them topologically sorted
    position = {n.name: float(i) for i, n in enumerate(source.graph.node) if n.name}
    if sum(n.name in position for n in nodes) < len(position) / 2:
        return
    producer = {t: k for k, n in enumerate(nodes) for t in n.output if t}
    ups = [sorted({producer[t] for t in n.input if t in producer}) for n in nodes]
    downs: list[list[int]] = [[] for _ in nodes]
    for k, us in enumerate(ups):
        for u in us:
            downs[u].append(k)
    key: list[float | None] = [position.get(n.name) for n in nodes]
    quantize = [n.op_type == "QuantizeLinear" and key[k] is None for k, n in enumerate(nodes)]

    def before_consumers(k: int) -> None:
        known = [key[c] for c in downs[k] if key[c] is not None]
        if key[k] is None and known:
            key[k] = min(known) - 0.5

    for k in reversed(range(len(nodes))):  # new nodes but quantizes: just before their first consumer
        if not quantize[k]:
            before_consumers(k)
    for k in range(len(nodes)):  # quantizes (and nodes only quantizes read): just after their producer
        if key[k] is None:
            known = [key[u] for u in ups[k] if key[u] is not None]
            key[k] = max(known) + 0.5 if known else None
    for k in reversed(range(len(nodes))):
        before_consumers(k)
    last = float(len(source.graph.node))
    ready = [(key[k] if key[k] is not None else last, k) for k in range(len(nodes)) if not ups[k]]
    heapq.heapify(ready)
    indegree = [len(us) for us in ups]
    order = []
    while ready:
        _, k = heapq.heappop(ready)
        order.append(k)
        for c in downs[k]:
            indegree[c] -= 1
            if indegree[c] == 0:
                heapq.heappush(ready, (key[c] if key[c] is not None else last, c))
    if len(order) == len(nodes):
        del quantized.graph.node[:]
        quantized.graph.node.extend(nodes[k] for k in order)


def quantize_onnx(fp32_path: str | Path, out_path: str | Path, calibration: np.ndarray, check: np.ndarray,
                  *, method: str = "minmax", integer_input: bool = False) -> QuantizeResult:
    """Quantize ``fp32_path`` to int8 (QDQ) calibrated on ``calibration``; parity on ``check`` (module docstring).

    ``calibration`` and ``check`` are float32 arrays ``(N, *input_shape[1:])``; ``method`` is ``minmax``,
    ``entropy`` or ``percentile`` (onnxruntime's calibration methods); ``integer_input``: the file
    takes the uint8 image (module docstring).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise MemplanError(f"unknown calibration method '{method}' (use {', '.join(methods)})")
    if len(calibration) == 0 or len(check) == 0:
        raise MemplanError("int8 quantization needs at least one calibration and one check sample")
    target = check_destination(out_path)
    import onnx

    source = onnx.load(str(fp32_path), load_external_data=False)
    input_name = source.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = _batches(calibration.astype(np.float32), input_name)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    with tempfile.TemporaryDirectory(dir=target.parent if target.parent.exists() else None) as tmp:
        pre, quantized = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        try:
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
            extra = {}
            if integer_input:  # one range for the image and every slice of it: one input quantization
                _, tensors, _ = _moved_input(onnx.load(str(pre), load_external_data=False).graph)
                lo, hi = float(min(0.0, calibration.min())), float(max(0.0, calibration.max()))
                extra["TensorQuantOverrides"] = {t: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}] for t in tensors}
            quantize_static(str(pre), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[method], extra_options=extra)
        except MemplanError:
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime's tools raise anything
            raise MemplanError(f"onnxruntime could not quantize '{fp32_path}': {describe_error(e)}") from None
        model = onnx.load(str(quantized))
        restore_order(model, source)
        scale, zero = make_integer_input(model) if integer_input else (None, None)
        onnx.save(model, str(quantized))
        fed = check.astype(np.float32) if scale is None else quantize_input(check, scale, zero)
        ref, got = _outputs(str(fp32_path), check.astype(np.float32)), _outputs(str(quantized), fed)
        diff = float(np.abs(ref - got).max())
        out_scale = float(np.abs(ref).max()) or 1.0
        agree = float((ref.argmax(1) == got.argmax(1)).mean())
        int8_bytes = quantized.stat().st_size
        publish(quantized, target)
    return QuantizeResult(str(target), "QDQ", len(calibration), method, len(check), agree, diff, diff / out_scale,
                          Path(fp32_path).stat().st_size, int8_bytes, scale, zero)
