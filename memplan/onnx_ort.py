"""Analyse the graph onnxruntime actually runs: its optimized model after fusions, not the exported one.

onnxruntime saves its optimized graph (``SessionOptions.optimized_model_filepath``); at level
``"extended"`` that holds Conv+BN folding, Conv+activation → ``FusedConv``, Gemm+activation →
``FusedGemm``..., at ``"all"`` (the onnxruntime default) also the CPU NCHWc layout ops
(``ReorderInput``/``ReorderOutput``, blocked ``Conv``/pools). The saved file carries onnxruntime's
shape information for most tensors; the few it leaves out (outputs of NCHWc ops, whose channel
blocking depends on the CPU) are probed by running the optimized graph once on zeros with those
tensors exposed as outputs. Op kinds come from :data:`memplan.onnx_frontend.OP_KINDS` (``FusedConv``
is a conv, ``FusedGemm`` a linear...).

Example:
    >>> import tempfile, torch
    >>> from memplan.export import export_onnx
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
    ...                           torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1), torch.nn.Hardswish())
    >>> path = tempfile.mkdtemp() + "/n.onnx"
    >>> _ = export_onnx(net, torch.zeros(1, 3, 16, 16), path)
    >>> r = analyze_ort_optimized(path, level="extended")
    >>> sorted({t.op for t in r.timeline})  # conv+BN+ReLU fused; hardswish run as x * HardSigmoid(x)
    ['Conv', 'FusedConv', 'HardSigmoid', 'Mul']
    >>> analyze_onnx(path).peak_bytes, r.peak_bytes  # so onnxruntime needs one more 8x16x16 map
    (16384, 24576)
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from memplan.analyze import MemoryReport, report_from_graph
from memplan.errors import MemplanError, describe_error
from memplan.onnx_frontend import analyze_onnx, graph_from_onnx, load_onnx, set_input_dims
from memplan.specs import parse_shape

LEVELS = ("basic", "extended", "all")


def ort_optimize(
    path: str | Path, out_path: str | Path, *, level: str = "all",
    input_shapes: Sequence[Sequence[int]] | None = None,
) -> Path:
    """Write the model onnxruntime builds from ``path`` at optimization ``level`` to ``out_path``.

    Input dims are made static first (``input_shapes``, else batch 1) so every shape is known.

    Example:
        >>> import tempfile, torch, onnx
        >>> from memplan.export import export_onnx
        >>> d = Path(tempfile.mkdtemp())
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
        >>> _ = export_onnx(net, torch.zeros(1, 3, 8, 8), d / "n.onnx")
        >>> [n.op_type for n in onnx.load(ort_optimize(d / "n.onnx", d / "o.onnx", level="extended")).graph.node]
        ['FusedConv']
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MemplanError(f"--ort-optimized needs onnxruntime ({e}); pip install onnxruntime") from e
    if level not in LEVELS:
        raise MemplanError(f"unknown onnxruntime optimization level '{level}' (use {', '.join(LEVELS)})")
    model = set_input_dims(load_onnx(path), input_shapes)
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        static = Path(tmp) / "static.onnx"
        onnx.save(model, str(static))
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
        so.optimized_model_filepath = str(out_path)
        so.log_severity_level = 3  # the NCHWc "hardware specific" notice is expected at level all
        try:
            ort.InferenceSession(str(static), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise MemplanError(f"onnxruntime cannot load {path}: {describe_error(e)}") from e
    return out_path


def _probe_missing_shapes(model: onnx.ModelProto, tmp: Path) -> onnx.ModelProto:
    """Add ``value_info`` for tensors without a static shape by running ``model`` once on zeros."""
    import onnxruntime as ort

    known = onnx.shape_inference.infer_shapes(model)
    graph = known.graph
    shaped = {vi.name for vi in [*graph.input, *graph.value_info, *graph.output]
              if vi.type.tensor_type.HasField("shape")
              and all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)}
    static = {t.name for t in graph.initializer}
    missing = [t for n in graph.node if n.op_type != "Constant" for t in n.output if t and t not in shaped | static]
    if not missing:
        return model
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in missing)
    probe_path = tmp / "probe.onnx"
    onnx.save(probe, str(probe_path))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(probe_path), so, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros(i.shape, dtype=_NP_TYPES.get(i.type, np.float32)) for i in sess.get_inputs()}
    values = sess.run(missing, feeds)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.value_info.extend(
        onnx.helper.make_tensor_value_info(t, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
        for t, v in zip(missing, values))
    return model


_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
             "tensor(int8)": np.int8, "tensor(bool)": np.bool_}


def analyze_ort_optimized(
    path: str | Path,
    *,
    level: str = "all",
    form: str = "deploy",
    dtype: str = "float32",
    inplace_elementwise: bool = False,
    input_shapes: Sequence[Sequence[int]] | None = None,
    name: str = "",
) -> MemoryReport:
    """Peak activation memory of the graph onnxruntime runs for ``path`` (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = ort_optimize(path, Path(tmp) / "optimized.onnx", level=level, input_shapes=input_shapes)
        model = _probe_missing_shapes(load_onnx(optimized, check=False), Path(tmp))
        g, params = graph_from_onnx(model, form=form, dtype=dtype,
                                    inplace_elementwise=inplace_elementwise, name=name or Path(path).stem,
                                    method=f"onnxruntime-{level}")
    return report_from_graph(g, param_bytes=params, model=g.model_name)


def analyze_onnx_file(
    path: str | Path,
    *,
    ort_optimized: bool = False,
    input_shape: str | None = None,
    form: str = "deploy",
    dtype: str = "float32",
    inplace_elementwise: bool = False,
) -> MemoryReport:
    """``memplan analyze FILE.onnx``: the exported graph, or with ``ort_optimized`` the one onnxruntime runs.

    ``input_shape`` is the CLI's ``--input`` text (e.g. ``"1,3,224,224"``) for the first graph input.

    Example:
        >>> import tempfile, torch
        >>> from memplan.export import export_onnx
        >>> path = tempfile.mkdtemp() + "/n.onnx"
        >>> _ = export_onnx(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1)), torch.zeros(1, 3, 8, 8), path)
        >>> analyze_onnx_file(path, input_shape="1,3,16,16").peak_bytes  # (3 + 8) channels x 16 x 16 x 4 B
        11264
    """
    shapes = [parse_shape(input_shape)] if input_shape else None
    kwargs = {"form": form, "dtype": dtype, "inplace_elementwise": inplace_elementwise, "input_shapes": shapes,
              "name": str(path)}
    return analyze_ort_optimized(path, **kwargs) if ort_optimized else analyze_onnx(path, **kwargs)
