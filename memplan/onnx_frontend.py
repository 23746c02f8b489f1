"""ONNX frontend: build the memory IR (:class:`~memplan.graph.MemGraph`) from an ``.onnx`` file.

Shapes come from ``onnx.shape_inference`` (strict mode); what it leaves open (contrib ops such as
``com.microsoft``'s ``QLinearAdd``) is probed with one onnxruntime run when onnxruntime is there.
Initializers, ``Constant`` outputs and everything computed only from them (``ConstantOfShape``
weights) are parameters, counted once as the network consumes them; values computed from static
shapes (``Shape`` chains, the exporter's zero-bias ``Expand``) are static too. Neither is an
activation (docs/definitions.md §1). Outputs nothing reads need no shape and take no memory. Alias ops (Reshape,
Flatten, Squeeze, Unsqueeze, Identity, Dropout in inference) share their input's storage. Every
node gets an op kind (conv, linear, bn, act, eltwise, pointwise, split, pad, quantize,
dequantize, other) from :data:`OP_KINDS`, so the same form rules as the PyTorch path apply
(docs/definitions.md §2): exporters' decomposed activations are one fused activation, Split
pieces are views, integer tensors keep their size, and a model exported by memplan has the same
deploy-form peak as its PyTorch deploy form. Control flow (If, Loop, Scan) counts as one opaque
op whose subgraph's own temporaries are not seen.

Example:
    >>> import tempfile, torch
    >>> from memplan.export import export_onnx
    >>> from memplan.zoo import create_model
    >>> path = tempfile.mkdtemp() + "/r18.onnx"
    >>> _ = export_onnx(create_model("resnet18"), torch.zeros(1, 3, 64, 64), path)
    >>> analyze_onnx(path).peak_bytes, analyze_onnx(path, input_shapes=[(1, 3, 224, 224)]).peak_bytes
    (327680, 4014080)
"""

from __future__ import annotations

import ast
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from google.protobuf.message import DecodeError

from memplan.analyze import MemoryReport, report_from_graph
from memplan.errors import MemplanError, describe_error
from memplan.graph import (
    DTYPES,
    FORMS,
    MemGraph,
    Op,
    Storage,
    apply_form,
)

ALIAS_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"})
SHAPE_OPS = frozenset({"Shape", "Size"})  # outputs depend only on (static) shapes
OP_KINDS: dict[str, str] = {
    **dict.fromkeys(["Conv", "ConvTranspose", "FusedConv", "NhwcConv", "NhwcFusedConv", "ConvInteger",
                     "QLinearConv"], "conv"),
    **dict.fromkeys(["Gemm", "MatMul", "FusedGemm", "FusedMatMul", "MatMulInteger", "QLinearMatMul", "QGemm"],
                    "linear"),
    **dict.fromkeys(["BatchNormalization"], "bn"),
    **dict.fromkeys(["Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu",
                     "Celu", "Gelu", "FastGelu", "QuickGelu", "BiasGelu", "Mish", "PRelu", "Softplus",
                     "ThresholdedRelu", "Swish", "Softsign", "QLinearSigmoid", "QLinearLeakyRelu"], "act"),
    **dict.fromkeys(["Add", "Mul", "Sub", "Div", "Sum", "QLinearAdd", "QLinearMul"], "eltwise"),
    # elementwise math exporters decompose activations into (docs/definitions.md §2, fused activations)
    **dict.fromkeys(["Erf", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal", "Pow", "Greater", "Less",
                     "GreaterOrEqual", "LessOrEqual", "Equal", "Where", "Max", "Min", "Sign", "Not", "And", "Or",
                     "Cast", "CastLike", "Floor", "Ceil", "Round"], "pointwise"),
    **dict.fromkeys(["Split", "Slice"], "split"),
    "Expand": "broadcast",
    "Transpose": "layout",  # a copy in another order (a view plus contiguous in PyTorch)
    "QuantizeLinear": "quantize",
    "DequantizeLinear": "dequantize",
}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE}


@dataclass(frozen=True)
class _TensorInfo:
    shape: tuple[int, ...]
    elem_type: int


def load_onnx(path: str | Path, *, check: bool = True) -> onnx.ModelProto:
    """Read an ONNX file; a missing, truncated, malformed or non-ONNX file is a :class:`MemplanError`.

    ``check`` runs ``onnx.checker.check_model`` (skip it for onnxruntime's optimized files, whose
    contrib ops the checker does not know). A file the checker rejects but onnxruntime loads (an
    IR-3 file whose initializers are not graph inputs, say) is analysed with a warning; external
    data that is missing or lies outside the file's directory is an error.

    Example:
        >>> import tempfile
        >>> bad = tempfile.mktemp(suffix=".onnx"); _ = open(bad, "w").write("not a model")
        >>> load_onnx(bad)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        memplan.errors.MemplanError: .../...onnx is not a valid ONNX model (...)
    """
    path = Path(path)
    if not path.is_file():
        raise MemplanError(f"ONNX file '{path}' does not exist or is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError, UnicodeDecodeError) as e:
        raise MemplanError(f"{path} is not a valid ONNX model ({describe_error(e)})") from e
    external = _load_small_external_data(model, path)
    if not model.graph.node or not model.opset_import:
        raise MemplanError(f"{path} is not a valid ONNX model (no graph nodes or opset)")
    if check:
        try:  # a file with external data is checked by path: the checker finds the data beside it
            onnx.checker.check_model(str(path) if external else model)
        except (onnx.checker.ValidationError, ValueError) as e:
            finding = describe_error(e)
            why = _onnxruntime_refuses(path if external else model)
            if why:
                raise MemplanError(f"{path} is not a valid ONNX model ({finding}; onnxruntime: {why})") from e
            warnings.warn(f"{path}: onnx.checker rejects it ({finding}) but onnxruntime loads it; analysing it",
                          stacklevel=2)
    return model


SMALL_EXTERNAL_BYTES = 1 << 20  # external tensors up to this size are read (shapes, indices); weights are not


def _load_small_external_data(model: onnx.ModelProto, path: Path) -> bool:
    """Read the external data of the small tensors (a reshape's shape, a gather's indices: what the
    analysis reads) and leave the weights on disk, so a file of any size loads in little memory.
    Returns whether the file has external data; missing data or data outside its directory is an error."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    tensors = [t for t in model.graph.initializer if uses_external_data(t)]
    tensors += [a.t for n in model.graph.node for a in n.attribute
                if a.type == onnx.AttributeProto.TENSOR and uses_external_data(a.t)]
    for t in tensors:
        size = math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        info = {e.key: e.value for e in t.external_data}
        location = (path.parent / info.get("location", "")).resolve()
        if not location.is_file() or path.parent.resolve() not in location.parents:
            raise MemplanError(f"cannot load the external data of {path}: tensor '{t.name}' lies in "
                               f"'{info.get('location')}', which is missing or outside the file's directory")
        if size <= SMALL_EXTERNAL_BYTES:
            try:
                load_external_data_for_tensor(t, str(path.parent))
            except (OSError, ValueError) as e:
                raise MemplanError(f"cannot load the external data of {path} ({describe_error(e)})") from e
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    return bool(tensors)


def _onnxruntime_refuses(model: onnx.ModelProto | Path) -> str:
    """Why onnxruntime cannot load ``model`` (a model, or a file with external data: "" if it can;
    the reason if onnxruntime is missing)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "not installed, so the checker's finding stands"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    try:
        source = str(model) if isinstance(model, Path) else model.SerializeToString()
        ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        return describe_error(e)
    return ""


def set_input_dims(model: onnx.ModelProto, input_shapes: Sequence[Sequence[int]] | None) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs have concrete dims: ``input_shapes`` if given, else 1 for
    a symbolic batch dim (any other symbolic dim is an error).

    Changing a static dim invalidates the exporter's ``value_info`` and output shapes, which are
    then dropped and re-inferred.

    Example:
        >>> from onnx import TensorProto, helper
        >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
        >>> m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [x]))
        >>> [d.dim_value for d in set_input_dims(m, None).graph.input[0].type.tensor_type.shape.dim]
        [1, 3]
    """
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if input_shapes is not None and len(input_shapes) != len(inputs):
        raise MemplanError(f"the model has {len(inputs)} input(s) but {len(input_shapes)} input shape(s) were given")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inputs = [i for i in model.graph.input if i.name not in inits]
    changed = False
    for k, inp in enumerate(inputs):
        dims = inp.type.tensor_type.shape.dim
        want = list(input_shapes[k]) if input_shapes is not None else None
        if want is not None and len(want) != len(dims):
            raise MemplanError(f"input '{inp.name}' has rank {len(dims)}, got shape {tuple(want)}")
        for j, d in enumerate(dims):
            known = d.HasField("dim_value") and d.dim_value > 0
            if want is not None:
                changed |= not known or d.dim_value != want[j]
                d.Clear()
                d.dim_value = want[j]
            elif not known:
                if j != 0:
                    raise MemplanError(f"input '{inp.name}' has a symbolic dim {j} ('{d.dim_param}'): pass an "
                                       "input shape")
                d.Clear()
                d.dim_value = 1
                changed = True
    if changed:  # stale: drop value_info, make output dims symbolic (re-inferred)
        del model.graph.value_info[:]
        for k, out in enumerate(model.graph.output):
            for j, d in enumerate(out.type.tensor_type.shape.dim):
                d.Clear()
                d.dim_param = f"out{k}_{j}"
    return model


def _infer(model: onnx.ModelProto, name: str) -> dict[str, _TensorInfo]:
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as e:
        raise MemplanError(f"ONNX shape inference failed on {name} ({describe_error(e)})") from e
    infos = {t.name: _TensorInfo(tuple(t.dims), t.data_type) for t in model.graph.initializer}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            infos[vi.name] = _TensorInfo(tuple(d.dim_value for d in tt.shape.dim), tt.elem_type)
    return infos


def _module_of(node: onnx.NodeProto) -> str:
    """The PyTorch module path a node came from: torch.onnx name scopes, else the legacy ``/a/a.0/b/Op``."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            parts = [s for s in ast.literal_eval(scopes)[:-1] if s]
        except (ValueError, SyntaxError):
            parts = []
        return parts[-1] if parts else ""
    path = ""
    for seg in node.name.strip("/").split("/")[:-1]:
        path = seg if not path or seg.startswith(path + ".") else f"{path}.{seg}"
    return path


def _nbytes(info: _TensorInfo, itemsize: int) -> int:
    numel = 1
    for d in info.shape:
        numel *= d
    if info.elem_type in _FLOAT_TYPES:
        return numel * itemsize
    return numel * onnx.helper.tensor_dtype_to_np_dtype(info.elem_type).itemsize




def graph_from_onnx(
    model: onnx.ModelProto | str | Path,
    *,
    form: str = "deploy",
    dtype: str = "float32",
    inplace_elementwise: bool = False,
    input_shapes: Sequence[Sequence[int]] | None = None,
    name: str = "",
    method: str = "onnx",
) -> tuple[MemGraph, int]:
    """The memory IR of an ONNX model in ``form``, and its parameter bytes (at ``dtype``).

    ``input_shapes`` (one per graph input) overrides the model's input dims; a symbolic batch dim
    defaults to 1.

    Example:
        >>> import onnx
        >>> from onnx import TensorProto, helper
        >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
        >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
        >>> m = helper.make_model(helper.make_graph(
        ...     [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Relu", ["s"], ["y"])],
        ...     "g", [x], [y]))
        >>> g, params = graph_from_onnx(m)
        >>> [(o.name, o.kind, o.writes) for o in g.ops], [st.nbytes for st in g.storages.values()]
        ([('Sigmoid_0', 'act', (1,)), ('Relu_1', 'act', ())], [16, 16])
    """
    if form not in FORMS:
        raise MemplanError(f"unknown form '{form}' (use {' or '.join(FORMS)})")
    if dtype not in DTYPES:
        raise MemplanError(f"unknown dtype '{dtype}' (use {', '.join(DTYPES)})")
    if not isinstance(model, onnx.ModelProto):
        name = name or Path(model).stem
        model = load_onnx(model)
    name = name or model.graph.name or "onnx"
    itemsize = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    model = set_input_dims(model, input_shapes)
    infos = _infer(model, name)
    graph = model.graph
    const, static = _static_values(graph)
    read = _read_names(graph)
    live = [i for i, n in enumerate(graph.node) if not set(n.output) <= static]
    consumed = {t for n in graph.node if not set(n.output) <= const for t in n.input}
    params = _parameters(graph, const, consumed | {o.name for o in graph.output})
    # what needs a static shape: activations someone reads, graph inputs, and the parameters
    needed = {t for i in live for t in graph.node[i].output if t in read} | params
    needed |= {i.name for i in graph.input if i.name not in static}
    if needed - infos.keys():
        infos.update(_probe_shapes(model, sorted(needed - infos.keys() - {i.name for i in graph.input})))

    def info(tensor: str, node: str) -> _TensorInfo:
        if tensor not in infos:
            raise MemplanError(f"ONNX shape inference could not give a static shape to '{tensor}' (written by "
                               f"{node}) in {name}; pass --input or export with static shapes")
        return infos[tensor]

    param_bytes = sum(_nbytes(info(t, "a constant"), itemsize) for t in sorted(params))
    storage_of: dict[str, int] = {}  # tensor name -> storage id
    producer_of: dict[str, str] = {}  # tensor name -> op name
    storages: dict[int, Storage] = {}
    ops: list[Op] = []
    input_shapes_out: list[tuple[int, ...]] = []
    for inp in graph.input:
        if inp.name in static:
            continue
        ti = info(inp.name, "the graph input")
        sid = len(storages)
        storages[sid] = Storage(sid, _nbytes(ti, itemsize), ti.shape, _dtype_name(ti.elem_type), None, "",
                                is_input=True)
        storage_of[inp.name] = sid
        input_shapes_out.append(ti.shape)

    used_names: set[str] = set()
    for i in live:
        node = graph.node[i]
        live_in = [t for t in node.input if t not in static]
        op_name = node.name or f"{node.op_type}_{i}"
        while op_name in used_names:
            op_name += "_"
        used_names.add(op_name)
        module = _module_of(node)
        reads = {storage_of[t] for t in live_in if t in storage_of}
        writes: list[int] = []
        out_bytes = 0
        for k, t in enumerate(node.output):
            if t not in read:  # an unread output (old Dropout's mask, MaxPool's indices) is never kept
                continue
            ti = info(t, op_name)
            out_bytes += _nbytes(ti, itemsize)
            if k == 0 and node.op_type in ALIAS_OPS and node.input[0] in storage_of:
                storage_of[t] = storage_of[node.input[0]]
            else:
                sid = len(storages)
                storages[sid] = Storage(sid, _nbytes(ti, itemsize), ti.shape, _dtype_name(ti.elem_type), op_name,
                                        module)
                storage_of[t] = sid
                writes.append(sid)
            producer_of[t] = op_name
        ops.append(Op(
            name=op_name, op=node.op_type, kind=_kind(node, graph), module=module,
            reads=tuple(sorted(reads)), writes=tuple(writes), out_bytes=out_bytes,
            deps=tuple(dict.fromkeys(producer_of[t] for t in live_in if t in producer_of)),
        ))
    for out in graph.output:
        if out.name in storage_of:
            storages[storage_of[out.name]].is_output = True
    g = MemGraph(ops, storages, form=form, dtype=dtype, method=method, model_name=name,
                 input_shapes=input_shapes_out)
    return apply_form(g, form, inplace_elementwise), param_bytes


def _constant(graph: onnx.GraphProto, name: str) -> onnx.TensorProto | None:
    """The initializer or ``Constant`` node value called ``name``, else None."""
    return next((t for t in graph.initializer if t.name == name), None) or next(
        (onnx.helper.get_attribute_value(a) for n in graph.node if n.op_type == "Constant" and
         n.output[0] == name for a in n.attribute if a.name == "value"), None)


def _kind(node: onnx.NodeProto, graph: onnx.GraphProto) -> str:
    """The node's op kind (:data:`OP_KINDS`); a ``Pad`` is ``pad`` when it pads with constant zeros; a
    ``Gather`` of one constant index is a ``split`` piece (PyTorch's ``select``/``x[i]``, a view)."""
    if node.op_type == "Gather":
        t = _constant(graph, node.input[1]) if len(node.input) > 1 else None
        return "split" if t is not None and list(t.dims) == [] else "other"
    if node.op_type != "Pad":
        return OP_KINDS.get(node.op_type, "other")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    value = attrs.get("value", 0.0)  # opset < 11; later the optional third input
    if len(node.input) > 2 and node.input[2]:
        t = _constant(graph, node.input[2])
        value = onnx.numpy_helper.to_array(t).item() if t is not None and list(t.dims) in ([], [1]) else None
    return "pad" if attrs.get("mode", b"constant") in (b"constant", "constant") and value == 0 else "other"


def _static_values(graph: onnx.GraphProto) -> tuple[set[str], set[str]]:
    """Names of the constants (initializers, ``Constant`` outputs and everything computed only from
    them) and of all static values (constants plus what depends only on static shapes)."""
    const = {t.name for t in graph.initializer} | {""}
    static = set(const)
    for node in graph.node:
        ins = set(node.input)
        if node.op_type == "Constant" or ins <= const:
            const.update(node.output)
        if node.op_type in SHAPE_OPS or ins <= static or node.op_type == "Constant":
            static.update(node.output)
    return const, static


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name some node (or a node of a subgraph) reads, plus the graph outputs."""
    read = {o.name for o in graph.output}
    for node in graph.node:
        read.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs] if attr.type in (onnx.AttributeProto.GRAPH,
                                                               onnx.AttributeProto.GRAPHS) else []:
                read |= _read_names(sub)
    return read


def _parameters(graph: onnx.GraphProto, const: set[str], consumed: set[str]) -> set[str]:
    """The constants the network consumes, each counted once in the form it is consumed in
    (docs/definitions.md §1): a weight built by ``ConstantOfShape`` or a transpose counts as the built
    tensor; a dequantized weight as the quantized tensor (and its scale and zero point), since a
    quantized runtime consumes it directly (docs/definitions.md §2)."""
    writer = {t: n for n in graph.node for t in n.output}
    params, todo = set(), [t for t in consumed if t in const and t]
    while todo:
        t = todo.pop()
        n = writer.get(t)
        if n is not None and OP_KINDS.get(n.op_type) == "dequantize":
            todo += [i for i in n.input if i]
        elif t not in params:
            params.add(t)
    return params


def _probe_shapes(model: onnx.ModelProto, tensors: Sequence[str]) -> dict[str, _TensorInfo]:
    """Shapes of ``tensors`` that shape inference left open (contrib ops such as ``com.microsoft``'s
    ``QLinearAdd``), from one onnxruntime run on zeros; {} if onnxruntime cannot run the model."""
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError:
        return {}
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in have)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        inits = {t.name for t in model.graph.initializer}
        feeds = {}
        for inp in model.graph.input:
            if inp.name not in inits:
                tt = inp.type.tensor_type
                feeds[inp.name] = np.zeros([d.dim_value for d in tt.shape.dim],
                                           onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        values = sess.run(list(tensors), feeds)
    except Exception:  # noqa: BLE001 - no shapes from onnxruntime: the caller reports the missing one
        return {}
    return {t: _TensorInfo(tuple(v.shape), onnx.helper.np_dtype_to_tensor_dtype(v.dtype))
            for t, v in zip(tensors, values)}


def _dtype_name(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name


def analyze_onnx(
    path: str | Path | onnx.ModelProto,
    *,
    form: str = "deploy",
    dtype: str = "float32",
    inplace_elementwise: bool = False,
    input_shapes: Sequence[Sequence[int]] | None = None,
    name: str = "",
    method: str = "onnx",
) -> MemoryReport:
    """Peak activation memory of an ONNX model (the same report as :func:`memplan.analyze.analyze`).

    Example:
        >>> import tempfile, torch
        >>> from memplan.export import export_onnx
        >>> path = tempfile.mkdtemp() + "/m.onnx"
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        >>> _ = export_onnx(net, torch.zeros(1, 3, 16, 16), path)
        >>> r = analyze_onnx(path)
        >>> r.peak_bytes, r.method  # input 3x16x16 + conv output 8x16x16, fp32
        (11264, 'onnx')
    """
    g, params = graph_from_onnx(path, form=form, dtype=dtype, inplace_elementwise=inplace_elementwise,
                                input_shapes=input_shapes, name=name, method=method)
    return report_from_graph(g, param_bytes=params, model=g.model_name)
