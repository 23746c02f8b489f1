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


def make_integer_input(model: Any) -> tuple[float, int]:
    """Make ``model`` (a QDQ onnx ModelProto, in place) take its input quantized: drop the input's
    QuantizeLinear, give the input its uint8 type and record scale and zero point in the metadata.

    The input must feed exactly one node, a QuantizeLinear with constant per-tensor uint8 parameters;
    otherwise a one-line :class:`MemplanError` says why.
    """
    from onnx import TensorProto, numpy_helper

    g = model.graph
    x = g.input[0]
    readers = [n for n in g.node if x.name in n.input]
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(a.t) for n in g.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    q = readers[0] if len(readers) == 1 and readers[0].op_type == "QuantizeLinear" else None
    if q is None or len(q.input) < 3 or q.input[1] not in consts or q.input[2] not in consts:
        kinds = ", ".join(sorted({n.op_type for n in readers})) or "nothing"
        raise MemplanError(f"cannot give '{x.name}' an integer input: it feeds {kinds}, not one QuantizeLinear "
                           "with constant parameters")
    scale, zero = consts[q.input[1]], consts[q.input[2]]
    if scale.size != 1 or zero.dtype != np.uint8:
        raise MemplanError(f"cannot give '{x.name}' an integer input: its quantization is not per-tensor uint8")
    for n in g.node:
        n.input[:] = [x.name if i == q.output[0] else i for i in n.input]
    g.node.remove(q)
    x.type.tensor_type.elem_type = TensorProto.UINT8
    meta = {p.key: p for p in model.metadata_props}
    for key, value in (("memplan.input_scale", repr(float(scale.item()))),
                       ("memplan.input_zero_point", str(int(zero.item())))):
        (meta[key] if key in meta else model.metadata_props.add(key=key)).value = value
    return float(scale.item()), int(zero.item())


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
            quantize_static(str(pre), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[method])
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
