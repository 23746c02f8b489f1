"""The peak activation memory of one onnxruntime CPU inference: ``memplan analyze --runtime ort``.

docs/definitions.md §2 (runtimes). What is modelled is onnxruntime's own behaviour, not an
idealised runtime:

- **The graph it runs**: the model onnxruntime builds at its default optimization level (``all``:
  Conv+BN folding, Conv+activation fusion, on x86 the NCHWc layout with ``ReorderInput`` /
  ``ReorderOutput`` and channels padded to the CPU's block size), read from
  ``SessionOptions.optimized_model_filepath``.
- **Its execution order**: onnxruntime's default order is a reverse DFS over node indices that the
  saved file does not keep, so the order (and every node's output shapes) is read from
  onnxruntime's own profile of one run on zeros. The NCHWc pass numbers the nodes it inserts in
  an order that varies between sessions, so a graph of parallel branches may run in another order
  in the next session: :func:`predict_ort` samples sessions until their orders agree and keeps
  the worst.
- **Its allocation planner** (``SequentialPlanner``, simulated by :func:`plan_ort`): a graph
  output gets its own buffer that lives to the end; an ``Alias`` kernel (Reshape, Flatten,
  Squeeze, Unsqueeze, Identity, Dropout) always shares its input; a ``MayInplace`` kernel (unary
  activations, Clip, Softmax; a ``FusedConv`` / NCHWc ``Conv`` over its fused ``Sum`` input) writes
  into its input when that input's buffer has no later reader and input and output have the same
  *known* shape; otherwise the most recently freed buffer of exactly the same shape and element
  size is reused, else a new one is allocated. Binary element-wise ops
  (Add, Mul, ...) and BatchNormalization declare no in-place at all in onnxruntime's CPU kernels.
- **Kernel scratch** (:data:`SCRATCH`): the temporary buffers a kernel allocates while it runs and
  frees before it returns, from onnxruntime's kernel sources: ``QLinearConv``'s int32 accumulator,
  im2col copy or indirection buffer, depending on whether MLAS's symmetric int8 kernel for this CPU
  takes the conv (:func:`conv_sym_dispatch`).
- **Frees**: a buffer is released after the last node, in execution order, that reads any value
  placed in it. A freed buffer that the planner hands to a later tensor therefore stays allocated
  from its first to its last user (this is why onnxruntime can need more than the liveness bound).

``--runtime ort-noreuse`` is a session with ``enable_mem_reuse = False``: the planner's freelist
hands nothing on (in-place kernels and aliases stay), so every buffer is freed after its last
reader. ``--runtime ort-arena`` replays the same allocations and frees through a model of onnxruntime's
BFC arena (:func:`simulate_bfc_arena`): requests rounded to 256 B, best-fit over free chunks,
splitting and coalescing, and regions grown by ``kNextPowerOfTwo`` from a 1 MiB first region.

Example:
    >>> import tempfile, onnx
    >>> from onnx import TensorProto, helper
    >>> v = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 64, 64])  # 64 KiB maps
    >>> nodes = [helper.make_node("Relu", ["x"], ["a"], name="r0"), helper.make_node("Sigmoid", ["a"], ["b"], name="s1"),
    ...          helper.make_node("Add", ["b", "x"], ["y"], name="add")]
    >>> path = tempfile.mkdtemp() + "/chain.onnx"
    >>> onnx.save(helper.make_model(helper.make_graph(nodes, "g", [v("x")], [v("y")])), path)
    >>> p = predict_ort(path)
    >>> [(b.tensor, b.kind) for b in p.buffers]  # the sigmoid runs in place over the relu's output
    [('(execution frame)', 'frame'), ('a', 'allocate'), ('y', 'output')]
    >>> p.peak_bytes - frame_bytes(p.graph) == 3 * 2**16  # input + a + y (+ 24 B per value: the frame)
    True
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memplan.analyze import LiveTensor, MemoryReport, TimelineStep
from memplan.errors import MemplanError, describe_error
from memplan.liveness import Lifetime

RUNTIMES = ("ort", "ort-arena", "ort-noreuse")

# onnx AttributeProto types a kernel's memory depends on: INT, FLOAT, STRING, INTS, FLOATS
_PLAIN_ATTRIBUTES = (1, 2, 3, 6, 7)
# Element sizes of the type names onnxruntime's profiler writes in ``output_type_shape``.
_TYPE_BYTES = {"float": 4, "float16": 2, "bfloat16": 2, "double": 8, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
               "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1}


@dataclass(frozen=True)
class KernelIO:
    """What an onnxruntime CPU kernel registration declares: ``(input, output)`` pairs that must
    share a buffer (``Alias``) or may (``MayInplace``)."""

    alias: tuple[tuple[int, int], ...] = ()
    may_inplace: tuple[tuple[int, int], ...] = ()


_ALIAS = KernelIO(alias=((0, 0),))
_INPLACE = KernelIO(may_inplace=((0, 0),))
_SUM_INPLACE = KernelIO(may_inplace=((3, 0),))  # the fused "Sum"/"Z" input of a conv becomes its output
# (domain, op type) -> declaration, from onnxruntime's CPU kernel registrations (KernelDefBuilder
# .Alias / .MayInplace), checked against its allocations on hand-built graphs
# (tests/test_ort_runtime.py). Every op not listed allocates its outputs.
KERNELS: dict[tuple[str, str], KernelIO] = {
    **{("", op): _ALIAS for op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout")},
    **{("", op): _INPLACE for op in ("Relu", "Sigmoid", "Tanh", "HardSigmoid", "LeakyRelu", "Elu", "Selu", "Celu",
                                     "Softplus", "Softsign", "ThresholdedRelu", "Clip", "Softmax")},
    ("com.microsoft", "FusedConv"): _SUM_INPLACE,
    ("com.microsoft", "NhwcFusedConv"): _SUM_INPLACE,
    ("com.microsoft.nchwc", "Conv"): _SUM_INPLACE,
}


def kernel_io(domain: str, op_type: str) -> KernelIO:
    """The declaration of ``domain:op_type`` (``ai.onnx`` is the default domain ``""``).

    Example:
        >>> kernel_io("ai.onnx", "Relu").may_inplace, kernel_io("", "Add")
        (((0, 0),), KernelIO(alias=(), may_inplace=()))
    """
    return KERNELS.get(("" if domain == "ai.onnx" else domain, op_type), KernelIO())


# --------------------------------------------------------------------------- kernel scratch
@dataclass(frozen=True)
class ConvSymDispatch:
    """MLAS's symmetric int8 convolution kernel for this CPU (``mlas/lib/convsym.cpp``,
    ``MLAS_CONV_SYM_DISPATCH``): the channel alignments that decide whether a QLinearConv takes it."""

    input_channel_alignment: int
    output_channel_alignment: int
    output_channel_pack: int
    arm64: bool = False  # ARM64 also skips pointwise convs and convs with under 64 input channels


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("flags", "Features")), "")
    return set(line.partition(":")[2].split())


def conv_sym_dispatch(signed: bool, machine: str | None = None, flags: set[str] | None = None
                      ) -> ConvSymDispatch | None:
    """The dispatch MLAS's platform init picks (``mlas/lib/platform.cpp``) for uint8 (``signed=False``) or
    int8 activations; None where there is none (x86 without AVX2; int8 activations on x86).

    Example:
        >>> conv_sym_dispatch(False, "x86_64", {"avx2"}).output_channel_alignment
        8
        >>> conv_sym_dispatch(False, "x86_64", {"avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl"}).output_channel_alignment
        4
        >>> conv_sym_dispatch(True, "x86_64", {"avx2"}) is None
        True
    """
    import platform

    machine = (machine or platform.machine()).lower()
    flags = _cpu_flags() if flags is None else flags
    if machine in ("x86_64", "amd64"):
        if signed or "avx2" not in flags:
            return None
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:  # Avx512Core / Avx512Vnni
            return ConvSymDispatch(4, 4, 16)
        return ConvSymDispatch(4, 8, 16)  # Avx2 / AvxVnni
    if machine in ("aarch64", "arm64"):
        if "asimddp" in flags:  # the dot-product kernels
            return ConvSymDispatch(4, 16, 16, arm64=True)
        return ConvSymDispatch(8, 8, 8, arm64=True)
    return None


def _ints(node: OrtNode, name: str, rank: int, default: int) -> list[int]:
    v = node.attributes.get(name)
    return [int(x) for x in v] if v else [default] * rank


def _direct_pointwise(node: OrtNode, kernel: int, rank: int) -> bool:
    """A 1-tap conv with stride 1 and no padding reads its input in place (no im2col, no indirection):
    onnxruntime's ``kernel_size == 1 && HasStridesOneAndNoPadding()``."""
    return (kernel == 1 and all(v == 1 for v in _ints(node, "strides", rank, 1))
            and all(v == 0 for v in _ints(node, "pads", 2 * rank, 0)))


def _qlinearconv_scratch(node: OrtNode, g: OrtGraph) -> list[tuple[str, int]]:
    """The temporary buffers of onnxruntime's ``QLinearConv`` kernel (``qlinearconv.cc``), in the order
    ``Compute`` allocates them; each lives while the kernel runs.

    A conv takes MLAS's symmetric path (``TryConvSymPrepack``) when its weights are int8 with all-zero
    zero points, the input zero point is a constant and the CPU's dispatch accepts the channels
    (:func:`conv_sym_dispatch`): requantization is then fused and only an indirection buffer (one
    pointer per kernel tap and output pixel) is needed unless the conv is pointwise, stride 1, no
    padding. Otherwise the kernel keeps an int32 accumulator of the whole output, plus an im2col copy
    (a depthwise conv: the indirection buffer) unless pointwise; a channels-first conv also copies
    its input and output to channels-last.
    """
    x, w = node.inputs[0], node.inputs[3]
    wc = g.constants.get(w)
    dynamic = wc is None  # weights computed at run time: reordered into a temporary, no symmetric packing
    if dynamic and g.shapes.get(w):
        wc = Constant(g.dtypes.get(w, "uint8"), tuple(g.shapes[w]))
    xshape = g.shapes.get(x)
    yshape = g.shapes.get(node.outputs[0])
    if wc is None or not xshape or not yshape or len(wc.dims) < 3:
        return []
    act = 1  # uint8 / int8 activations
    channels_last = bool(node.attributes.get("channels_last", 0)) and node.domain == "com.microsoft"
    rank = len(wc.dims) - 2
    c = xshape[-1] if channels_last else xshape[1]
    spatial_in = xshape[1:-1] if channels_last else xshape[2:]
    spatial_out = yshape[1:-1] if channels_last else yshape[2:]
    m, cg = wc.dims[0], wc.dims[1]
    kernel = _numel(wc.dims[2:])
    group = int(node.attributes.get("group", 1))
    mg = m // group
    in_image, out_image = _numel(spatial_in), _numel(spatial_out)
    xzp = g.constants.get(node.inputs[2]) if len(node.inputs) > 2 else None
    wzp = g.constants.get(node.inputs[5]) if len(node.inputs) > 5 else None
    symmetric = False
    dispatch = conv_sym_dispatch(g.dtypes.get(x) == "int8")
    if (not dynamic and dispatch is not None and wc.dtype == "int8" and xzp is not None and xzp.values is not None
            and len(xzp.values) == 1 and wzp is not None and wzp.values is not None and not any(wzp.values)):
        if group > 1:
            symmetric = cg == 1 and mg == 1 and group % (8 if dispatch.arm64 else 16) == 0
        else:
            symmetric = (not (dispatch.arm64 and (kernel <= 1 or c < 64)) and m >= dispatch.output_channel_pack
                         and c % dispatch.input_channel_alignment == 0 and m % dispatch.output_channel_alignment == 0)
    overrun = 30 if dispatch is not None and dispatch.arm64 else 0  # MLAS_SYMM_QGEMM_BUF_OVERRUN
    depthwise = cg == 1 and mg == 1
    blocks: list[tuple[str, int]] = [("reordered weights", _numel(wc.dims))] if dynamic else []
    if not symmetric:
        blocks.append(("int32 accumulator", 4 * m * out_image))
    if not channels_last:
        blocks += [("channels-last input", act * (c * in_image + overrun)), ("channels-last output", act * m * out_image)]
    pointwise = _direct_pointwise(node, kernel, rank)
    if depthwise or (not pointwise and symmetric):
        blocks.append(("indirection buffer", 8 * kernel * out_image))
    elif not pointwise:
        blocks.append(("im2col", act * ((group if rank > 2 else 1) * cg * kernel * out_image + overrun)))
    return [(label, n) for label, n in blocks if n > 0]


def _convinteger_scratch(node: OrtNode, g: OrtGraph) -> list[tuple[str, int]]:
    """``ConvInteger`` (``conv_integer.cc``, dynamic quantization): one group's uint8 im2col unless the
    conv is pointwise, stride 1, no padding; it writes int32 straight into its output."""
    xshape, wshape = g.shapes.get(node.inputs[0]), g.shapes.get(node.inputs[1])
    wdims = g.constants[node.inputs[1]].dims if node.inputs[1] in g.constants else wshape
    yshape = g.shapes.get(node.outputs[0])
    if not xshape or not wdims or not yshape or len(wdims) < 3:
        return []
    rank = len(wdims) - 2
    kernel = _numel(wdims[2:])
    if _direct_pointwise(node, kernel, rank):
        return []
    return [("im2col", wdims[1] * kernel * _numel(yshape[2:]))]


# (domain, op type) -> the temporary buffers its kernel allocates while it runs: (label, bytes) in order
SCRATCH: dict[tuple[str, str], Any] = {
    ("", "QLinearConv"): _qlinearconv_scratch,
    ("com.microsoft", "QLinearConv"): _qlinearconv_scratch,
    ("", "ConvInteger"): _convinteger_scratch,
}


def kernel_scratch(node: OrtNode, g: OrtGraph) -> list[tuple[str, int]]:
    """The temporary buffers ``node``'s kernel allocates while it runs (:data:`SCRATCH`; none if unlisted)."""
    handler = SCRATCH.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type))
    return handler(node, g) if handler is not None else []


@dataclass(frozen=True)
class OrtNode:
    """One node of the optimized graph, in onnxruntime's execution order."""

    name: str
    domain: str
    op_type: str
    inputs: tuple[str, ...]  # "" = an omitted optional input
    outputs: tuple[str, ...]
    attributes: dict[str, Any] = field(default_factory=dict)  # int / float / str / list attributes


@dataclass(frozen=True)
class Constant:
    """An initializer as a kernel sees it at session creation: element type, dims, and its values
    when it is small (zero points, scales; ``None`` for weights)."""

    dtype: str  # numpy name: "int8", "uint8", "float32", ...
    dims: tuple[int, ...]
    values: tuple[float, ...] | None = None


@dataclass
class OrtGraph:
    """The graph onnxruntime runs, what its planner knows about each tensor, and every tensor's size."""

    nodes: list[OrtNode]
    nbytes: dict[str, int]  # every activation tensor (graph inputs and node outputs)
    shapes: dict[str, tuple[int, ...]]
    planner_shapes: dict[str, tuple[tuple[int, ...], int]]  # tensors whose (shape, element size) the planner knows
    inputs: list[str]
    outputs: list[str]
    initializers: set[str]
    name: str = ""
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    param_bytes: int = 0
    constants: dict[str, Constant] = field(default_factory=dict)  # initializers: dtype, dims, small values
    dtypes: dict[str, str] = field(default_factory=dict)  # activation -> numpy element type ("float32", "uint8", ...)


@dataclass(frozen=True)
class OrtBuffer:
    """One buffer onnxruntime allocates: the tensor it was allocated for, every tensor placed in it,
    and its live interval [alloc_step, free_step] (steps of the execution order, both inclusive)."""

    tensor: str
    nbytes: int
    shape: tuple[int, ...]
    kind: str  # "allocate" (planned), "output" (a graph output, never freed), "scratch" (a kernel's
    # temporary) or "frame" (the run's table of every value, onnxruntime's ExecutionFrame)
    alloc_step: int
    free_step: int
    tensors: tuple[str, ...]
    producer: str  # node name


@dataclass
class OrtPlan:
    """onnxruntime's plan for one run: buffers in allocation order, the peak and where it is.

    ``peak_bytes`` counts the graph inputs (owned by the caller, live throughout), like every
    other peak memplan reports (docs/definitions.md §1).
    """

    graph: OrtGraph
    buffers: list[OrtBuffer]
    placement: dict[str, str]  # tensor -> the tensor whose buffer holds it
    reuse: dict[str, str]  # tensor -> "alias" | "inplace" | "freelist" | "allocate" | "output"
    live_bytes: list[int]
    input_bytes: int
    runtime: str = "ort"
    arena: ArenaResult | None = None
    orders_seen: int = 1  # distinct execution orders onnxruntime chose over the sessions sampled
    peak_range: tuple[int, int] | None = None  # (lowest, highest) peak over those orders

    @property
    def peak_bytes(self) -> int:
        """Predicted peak: planned buffers live at once plus the inputs (or the arena's footprint)."""
        if self.arena is not None:
            return self.arena.touched_bytes + self.input_bytes
        return max(self.live_bytes, default=0) + self.input_bytes

    @property
    def peak_step(self) -> int:
        """First step at which the planned buffers reach their maximum."""
        return self.live_bytes.index(max(self.live_bytes)) if self.live_bytes else 0

    def live_at(self, step: int) -> list[OrtBuffer]:
        """Buffers live at ``step``, largest first."""
        return sorted((b for b in self.buffers if b.alloc_step <= step <= b.free_step), key=lambda b: -b.nbytes)

    def events(self) -> list[tuple[int, str, OrtBuffer]]:
        """(step, "alloc" | "free", buffer) in the order onnxruntime issues them: a node's outputs and
        then its kernel's scratch are allocated while it runs, the scratch freed when the kernel
        returns, its dead buffers after it."""
        ev = [(b.alloc_step, 0, i, "alloc", b) for i, b in enumerate(self.buffers)]
        ev += [(b.free_step, 1 if b.kind == "scratch" else 2, i, "free", b) for i, b in enumerate(self.buffers)
               if b.kind != "output"]
        return [(s, kind, b) for s, _, _, kind, b in sorted(ev, key=lambda e: e[:3])]


# --------------------------------------------------------------------------- reading onnxruntime
def _static_copy(path: str | Path, input_shapes: Sequence[Sequence[int]] | None, dest: Path) -> Any:
    """A copy of the model with concrete input dims and a unique name on every node (the profile
    identifies nodes by name)."""
    from memplan.onnx_frontend import load_onnx, set_input_dims

    model = set_input_dims(load_onnx(path), input_shapes)
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name += "_"
        seen.add(name)
        node.name = name
    import onnx

    onnx.save(model, str(dest))
    return model


def _session_options(ort: Any, *, arena: bool, threads: int = 1) -> Any:
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = arena
    so.enable_mem_pattern = False
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # the NCHWc "hardware specific" notice is expected at level all
    return so


def load_ort_graph(path: str | Path, input_shapes: Sequence[Sequence[int]] | None = None) -> OrtGraph:
    """What onnxruntime (CPU, default optimization level) runs for ``path``: see the module docstring.

    Example:
        >>> import tempfile, onnx
        >>> from onnx import TensorProto, helper, numpy_helper
        >>> import numpy as np
        >>> w = numpy_helper.from_array(np.ones((8, 3, 3, 3), np.float32), "w")
        >>> nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["y"])]
        >>> v = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
        >>> path = tempfile.mkdtemp() + "/n.onnx"
        >>> onnx.save(helper.make_model(helper.make_graph(nodes, "g", [v("x", [1, 3, 8, 8])], [v("y", [1, 8, 6, 6])],
        ...                                               [w])), path)
        >>> g = load_ort_graph(path)
        >>> [n.op_type for n in g.nodes if n.op_type == "Relu"], g.nbytes["y"]  # relu fused into the conv; 8x6x6 floats
        ([], 1152)
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MemplanError(f"--runtime ort needs onnxruntime ({e}); pip install onnxruntime") from e
    import numpy as np
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        static = tmp_path / "static.onnx"
        model = _static_copy(path, input_shapes, static)
        so = _session_options(ort, arena=False)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        so.enable_profiling = True
        so.profile_file_prefix = str(tmp_path / "profile")
        so.log_severity_level = 4  # a session that fails to load still logs that it has no profile to end
        try:
            sess = ort.InferenceSession(str(static), so, providers=["CPUExecutionProvider"])
            feeds = {i.name: np.zeros(_dims(i.shape, i.name), dtype=_np_type(i.type)) for i in sess.get_inputs()}
            sess.run(None, feeds)
            profile = json.loads(Path(sess.end_profiling()).read_text())
        except MemplanError:
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            reason = describe_error(e).replace(str(static), str(path))
            raise MemplanError(f"onnxruntime cannot load or run {path}: {reason}") from None
        optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    return _graph_from(optimized, model, profile, name=Path(path).stem)


def _dims(shape: Sequence[Any], name: str) -> list[int]:
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise MemplanError(f"input '{name}' has a symbolic shape {shape}: pass an input shape")
    return list(shape)


def _np_type(ort_type: str) -> Any:
    import numpy as np

    name = ort_type.removeprefix("tensor(").removesuffix(")")
    return {"float": np.float32, "float16": np.float16, "double": np.float64, "bool": np.bool_}.get(
        name, getattr(np, name, np.float32))


def _graph_from(optimized: Any, original: Any, profile: list[dict[str, Any]], *, name: str) -> OrtGraph:
    """Join the optimized file (structure, what the planner knows) with the profile (order, shapes)."""
    import onnx

    graph = optimized.graph
    by_name = {n.name: n for n in graph.node}
    kernel_events = [e for e in profile if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    order: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    nbytes: dict[str, int] = {}
    dtypes: dict[str, str] = {}
    # nodes onnxruntime creates itself (inlined functions) may have no name: the profile calls them
    # "<op>_<node index>", an index the saved file does not keep, so they are matched by op type to the first such node whose inputs are all computed
    unnamed = [n for n in graph.node if not n.name]
    for k, n in enumerate(unnamed):
        n.name = f"(unnamed {n.op_type} {k})"
        by_name[n.name] = n
    available = {t.name for t in [*graph.input, *graph.initializer]} | {""}
    for e in kernel_events:
        node_name = e["name"][: -len("_kernel_time")]
        node = by_name.get(node_name) or next(
            (n for n in unnamed if n.op_type == e.get("args", {}).get("op_name") and n.name not in order
             and all(t in available for t in n.input)), None)
        if node is None or node.name in order:
            continue
        order.append(node.name)
        available.update(node.output)
        outs = [t for t in node.output if t]
        for t, ts in zip(outs, e.get("args", {}).get("output_type_shape", [])):
            ((tname, dims),) = ts.items()
            shapes[t] = tuple(int(d) for d in dims)
            nbytes[t] = _TYPE_BYTES.get(tname, 4) * _numel(shapes[t])
            dtypes[t] = {"float": "float32", "double": "float64"}.get(tname, tname)
    missing = [n.name for n in graph.node if n.name not in set(order)]
    if missing:
        raise MemplanError(f"onnxruntime's profile has no execution record for node(s) {missing[:3]} of {name}")
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    input_shapes = []
    for i in inputs:
        tt = i.type.tensor_type
        shapes[i.name] = tuple(d.dim_value for d in tt.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        nbytes[i.name] = dtype.itemsize * _numel(shapes[i.name])
        dtypes[i.name] = dtype.name
        input_shapes.append(shapes[i.name])
    # the planner compares NodeArg shapes; onnxruntime's graph carries them for every static-shaped
    # tensor, its NCHWc outputs included (the saved file just leaves those out of value_info)
    planner = {t: (s, nbytes[t] // max(_numel(s), 1)) for t, s in shapes.items() if _numel(s)}
    nodes = [OrtNode(n, by_name[n].domain, by_name[n].op_type, tuple(by_name[n].input), tuple(by_name[n].output),
                     {a.name: onnx.helper.get_attribute_value(a) for a in by_name[n].attribute
                      if a.type in _PLAIN_ATTRIBUTES})
             for n in order]
    constants = {t.name: _constant(t) for t in graph.initializer}
    param_bytes = sum(onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * _numel(t.dims)
                      for t in graph.initializer)
    return OrtGraph(nodes=nodes, nbytes=nbytes, shapes=shapes, planner_shapes=planner,
                    inputs=[i.name for i in inputs], outputs=[o.name for o in graph.output], initializers=inits,
                    name=name or original.graph.name, input_shapes=input_shapes, param_bytes=param_bytes,
                    constants=constants, dtypes=dtypes)


_SMALL_CONSTANT = 1024  # elements: zero points and scales are read, weights are not


def _constant(t: Any) -> Constant:
    import onnx
    from onnx import numpy_helper

    dims = tuple(int(d) for d in t.dims)
    values = None
    if _numel(dims) <= _SMALL_CONSTANT and t.data_location != onnx.TensorProto.EXTERNAL:
        values = tuple(float(v) for v in numpy_helper.to_array(t).reshape(-1))
    return Constant(onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name, dims, values)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# --------------------------------------------------------------------------- the planner
def plan_ort(g: OrtGraph, *, reuse_freed: bool = True) -> OrtPlan:
    """Simulate onnxruntime's sequential allocation planner and its release plan over ``g``
    (``reuse_freed=False``: ``enable_mem_reuse`` off, every tensor the freelist would place gets its
    own buffer; aliases and in-place kernels are kept).

    Example:
        >>> g = OrtGraph(nodes=[OrtNode("r", "", "Relu", ("x",), ("a",)), OrtNode("t", "", "Tanh", ("x",), ("b",)),
        ...                     OrtNode("m", "", "Mul", ("a", "b"), ("y",))],
        ...              nbytes={"x": 64, "a": 64, "b": 64, "y": 64}, shapes={}, planner_shapes={},
        ...              inputs=["x"], outputs=["y"], initializers=set())
        >>> p = plan_ort(g)
        >>> [(b.tensor, b.alloc_step, b.free_step) for b in p.buffers], p.peak_bytes  # Mul is not in place
        ([('(execution frame)', 0, 2), ('a', 0, 2), ('b', 1, 2), ('y', 2, 2)], 352)

    (x, a, b and y at the Mul: 256 B, and the run's frame of four 24-byte values.)
    """
    use: dict[str, int] = {}
    for t in [*g.inputs, *g.initializers]:
        use[t] = use.get(t, 0) + 1
    for n in g.nodes:
        for t in n.inputs:
            if t:
                use[t] = use.get(t, 0) + 1
        for t in n.outputs:
            if t:
                use[t] = use.get(t, 0) + 1
    for t in g.outputs:
        use[t] = use.get(t, 0) + 1
    buffer_of: dict[str, str] = {t: t for t in [*g.inputs, *g.initializers]}
    reuse: dict[str, str] = {}
    freelist: list[str] = []  # most recently freed first
    outputs = set(g.outputs)

    def same_size(a: str, b: str) -> bool:
        return a in g.planner_shapes and b in g.planner_shapes and g.planner_shapes[a] == g.planner_shapes[b]

    def place(t: str, base: str, how: str) -> None:
        original = buffer_of[base]
        buffer_of[t] = original
        use[original] += use[t]
        reuse[t] = how

    for n in g.nodes:
        io = kernel_io(n.domain, n.op_type)
        for k, t in enumerate(n.outputs):
            if not t:
                continue
            buffer_of[t] = t
            if t in outputs:
                reuse[t] = "output"
                continue
            alias = next((n.inputs[i] for i, o in io.alias if o == k and i < len(n.inputs) and n.inputs[i]), None)
            if alias is not None:
                place(t, alias, "alias")
                continue
            inplace = next((n.inputs[i] for i, o in io.may_inplace if o == k and i < len(n.inputs) and n.inputs[i]
                            and use[buffer_of[n.inputs[i]]] == 1 and same_size(n.inputs[i], t)), None)
            if inplace is not None:
                place(t, inplace, "inplace")
                continue
            if reuse_freed and t in g.planner_shapes and g.planner_shapes[t][0]:
                free = next((f for f in freelist if same_size(f, t)), None)
                if free is not None:
                    freelist.remove(free)
                    place(t, free, "freelist")
                    continue
            reuse[t] = "allocate"
        for t in [*n.inputs, *n.outputs]:
            if t:
                original = buffer_of[t]
                use[original] -= 1
                if use[original] == 0:
                    freelist.insert(0, original)
    return _release_plan(g, buffer_of, reuse)


# sizeof(OrtValue) on a 64-bit build: a shared_ptr<void> (16 B) and the MLDataType pointer (8 B)
ORT_VALUE_BYTES = 24


def frame_bytes(g: OrtGraph) -> int:
    """What every run allocates before its first kernel: the ExecutionFrame's ``std::vector<OrtValue>``
    with one entry per value of the graph (inputs, initializers, every node's inputs and outputs).
    Negligible for most models; a patched model of many bands has thousands of values (120 KB for
    5,000)."""
    values = set(g.inputs) | set(g.initializers) | set(g.nbytes)
    for n in g.nodes:
        values.update(t for t in (*n.inputs, *n.outputs) if t)
    return ORT_VALUE_BYTES * len(values)


def _release_plan(g: OrtGraph, buffer_of: dict[str, str], reuse: dict[str, str]) -> OrtPlan:
    """Buffers and their lives: a planned buffer is freed after the last node reading any tensor in it."""
    step_of = {t: i for i, n in enumerate(g.nodes) for t in n.outputs if t}
    producer = {t: n.name for n in g.nodes for t in n.outputs if t}
    last = len(g.nodes) - 1
    owners = [t for n in g.nodes for t in n.outputs if t and reuse[t] in ("allocate", "output")]
    free_step = {t: (last if reuse[t] == "output" else None) for t in owners}
    for i, n in enumerate(g.nodes):
        for t in n.inputs:
            base = buffer_of.get(t)
            if base in free_step and reuse[base] == "allocate":
                free_step[base] = i
    members: dict[str, list[str]] = {t: [] for t in owners}
    for t, base in buffer_of.items():
        if base in members:
            members[base].append(t)
    owned: dict[int, list[str]] = {}
    for t in owners:
        owned.setdefault(step_of[t], []).append(t)
    buffers = [OrtBuffer(tensor="(execution frame)", nbytes=frame_bytes(g), shape=(), kind="frame", alloc_step=0,
                         free_step=last, tensors=(), producer=g.nodes[0].name)] if g.nodes else []
    for i, n in enumerate(g.nodes):  # a node's outputs, then the temporary buffers its kernel allocates
        buffers += [OrtBuffer(tensor=t, nbytes=g.nbytes.get(t, 0), shape=g.shapes.get(t, ()), kind=reuse[t],
                              alloc_step=i, free_step=last if free_step[t] is None else free_step[t],
                              tensors=tuple(members[t]), producer=producer[t]) for t in owned.get(i, [])]
        buffers += [OrtBuffer(tensor=f"{n.name} ({label})", nbytes=nb, shape=(), kind="scratch", alloc_step=i,
                              free_step=i, tensors=(), producer=n.name) for label, nb in kernel_scratch(n, g)]
    diff = [0] * (len(g.nodes) + 1)
    for b in buffers:
        diff[b.alloc_step] += b.nbytes
        diff[b.free_step + 1] -= b.nbytes
    live, acc = [], 0
    for d in diff[:-1]:
        acc += d
        live.append(acc)
    return OrtPlan(graph=g, buffers=buffers, placement=dict(buffer_of), reuse=reuse, live_bytes=live,
                   input_bytes=sum(g.nbytes[t] for t in g.inputs))


# --------------------------------------------------------------------------- the BFC arena
ARENA_MIN_ALLOC = 256  # BFCArena::kMinAllocationSize: requests are rounded up to a multiple of it
ARENA_INITIAL_CHUNK = 1 << 20  # default initial_chunk_size_bytes
ARENA_MAX_DEAD_BYTES = 128 << 20  # default max_dead_bytes_per_chunk


@dataclass(frozen=True)
class ArenaResult:
    """The arena after one run: regions it grew (bytes reserved from the OS) and the bytes of them a
    run touches (what RSS sees: pages of a region beyond its highest used offset stay untouched)."""

    regions: tuple[int, ...]
    reserved_bytes: int
    touched_bytes: int
    peak_in_use_bytes: int


def simulate_bfc_arena(events: Sequence[tuple[str, int, int]], *, initial_chunk: int = ARENA_INITIAL_CHUNK,
                       max_dead_bytes: int = ARENA_MAX_DEAD_BYTES) -> ArenaResult:
    """Replay ``(kind, id, nbytes)`` events ("alloc"/"free") through a model of onnxruntime's BFC arena.

    Best fit over free chunks (smallest, then lowest address); a chunk is split when it is at least
    twice the request or would waste ``max_dead_bytes``; freed chunks coalesce with free
    neighbours of the same region; with no fit the arena grows by a region of the current growth
    size, doubled until it covers the request, and doubled again after a growth that did not need to
    (``kNextPowerOfTwo``).

    Example:
        >>> r = simulate_bfc_arena([("alloc", 0, 600_000), ("alloc", 1, 600_000), ("free", 0, 0), ("alloc", 2, 300_000)])
        >>> r.regions, r.touched_bytes  # 1 MiB holds the first; the second needs a new 2 MiB region
        ((1048576, 2097152), 1200128)
    """
    region_sizes: list[int] = []
    chunks: list[list[list[int]]] = []  # per region: [offset, size, owner or -1], sorted by offset
    touched: list[int] = []
    where: dict[int, tuple[int, int]] = {}
    growth = max(ARENA_MIN_ALLOC, _round(initial_chunk))
    in_use = peak = 0

    def find(size: int) -> tuple[int, int] | None:
        best = None
        for r, cs in enumerate(chunks):
            for c in cs:
                if c[2] < 0 and c[1] >= size and (best is None or (c[1], r, c[0]) < best[0]):
                    best = ((c[1], r, c[0]), r, c[0])
        return None if best is None else (best[1], best[2])

    for kind, ident, nbytes in events:
        if kind == "free":
            if ident not in where:
                continue
            r, off = where.pop(ident)
            cs = chunks[r]
            i = next(k for k, c in enumerate(cs) if c[0] == off)
            in_use -= cs[i][1]
            cs[i][2] = -1
            if i + 1 < len(cs) and cs[i + 1][2] < 0:
                cs[i][1] += cs.pop(i + 1)[1]
            if i > 0 and cs[i - 1][2] < 0:
                cs[i - 1][1] += cs.pop(i)[1]
            continue
        size = _round(max(nbytes, 1))
        hit = find(size)
        if hit is None:
            increased = False
            while size > growth:
                growth *= 2
                increased = True
            region_sizes.append(growth)
            chunks.append([[0, growth, -1]])
            touched.append(0)
            if not increased:
                growth *= 2
            hit = (len(chunks) - 1, 0)
        r, off = hit
        cs = chunks[r]
        i = next(k for k, c in enumerate(cs) if c[0] == off)
        c = cs[i]
        if c[1] >= 2 * size or c[1] - size >= max_dead_bytes:
            cs.insert(i + 1, [off + size, c[1] - size, -1])
            c[1] = size
        c[2] = ident
        where[ident] = (r, off)
        touched[r] = max(touched[r], off + min(c[1], _round(nbytes)))
        in_use += c[1]
        peak = max(peak, in_use)
    return ArenaResult(regions=tuple(region_sizes), reserved_bytes=sum(region_sizes), touched_bytes=sum(touched),
                       peak_in_use_bytes=peak)


def _round(n: int) -> int:
    return (n + ARENA_MIN_ALLOC - 1) // ARENA_MIN_ALLOC * ARENA_MIN_ALLOC


# --------------------------------------------------------------------------- entry points
def _order_key(g: OrtGraph) -> tuple:
    # optimizer-made nodes are renamed per session: compare kinds and output shapes, not names
    return tuple((n.op_type, tuple(g.shapes.get(t, ()) for t in n.outputs if t)) for n in g.nodes)


def sample_orders(path: str | Path, input_shapes: Sequence[Sequence[int]] | None = None, *, sessions: int = 2,
                  max_sessions: int = 5) -> list[OrtGraph]:
    """The graph onnxruntime runs for ``path`` in each distinct execution order seen over ``sessions``
    sessions, or up to ``max_sessions`` when their orders differ (:func:`predict_ort`)."""
    graphs: dict[tuple, OrtGraph] = {}
    for k in range(max(1, max_sessions)):
        if k >= max(1, sessions) and len(graphs) == 1:
            break  # the sessions so far agree: onnxruntime's order for this graph is fixed
        g = load_ort_graph(path, input_shapes)
        graphs.setdefault(_order_key(g), g)
    return list(graphs.values())


def worst_plan(graphs: Sequence[OrtGraph], runtime: str = "ort") -> OrtPlan:
    """The ``runtime`` plan of the order in ``graphs`` with the highest peak, with ``orders_seen`` and
    ``peak_range`` over all of them."""
    if runtime not in RUNTIMES:
        raise MemplanError(f"unknown runtime '{runtime}' (use {' or '.join(RUNTIMES)})")
    plans = [plan_ort(g, reuse_freed=runtime != "ort-noreuse") for g in graphs]
    peaks = sorted(p.peak_bytes for p in plans)
    plan = max(plans, key=lambda p: p.peak_bytes)
    plan.orders_seen, plan.peak_range = len(plans), (peaks[0], peaks[-1])
    plan.runtime = runtime
    if runtime == "ort-arena":
        plan.arena = simulate_bfc_arena([(kind, id(b), b.nbytes) for _, kind, b in plan.events()])
    return plan


def predict_ort(
    path: str | Path, input_shapes: Sequence[Sequence[int]] | None = None, *, runtime: str = "ort",
    sessions: int = 2, max_sessions: int = 5,
) -> OrtPlan:
    """onnxruntime's plan for one CPU inference of the ONNX file ``path``: arena off (``ort``), the BFC
    arena on (``ort-arena``), or arena off with ``SessionOptions.enable_mem_reuse = False``
    (``ort-noreuse``: no freed buffer is handed to a later tensor).

    ``input_shapes``: one shape per graph input (default: the file's, a symbolic batch = 1).

    onnxruntime's execution order is not always the same from one session to the next: at its
    default level the NCHWc layout pass inserts nodes in an order that varies, and a graph of
    parallel branches (a patched model, inception blocks) then runs its branches in another order.
    ``sessions`` sessions are sampled; if their orders differ, up to ``max_sessions``
    (:func:`sample_orders`). The plan returned is the order with the highest peak (the one a
    deployment must fit), with ``orders_seen`` and ``peak_range`` saying how far the orders seen
    differ (:func:`worst_plan`); to compare runtimes on the same orders, plan one sample with both.
    """
    if runtime not in RUNTIMES:
        raise MemplanError(f"unknown runtime '{runtime}' (use {' or '.join(RUNTIMES)})")
    return worst_plan(sample_orders(path, input_shapes, sessions=sessions, max_sessions=max_sessions), runtime)


def plan_report(plan: OrtPlan) -> MemoryReport:
    """The plan as the report ``memplan analyze`` prints and writes (``peak_bytes``, ``live_at_peak``...).

    ``extra`` adds the plan: every buffer with its tensors and live steps, and how each tensor was
    placed (``alias``, ``inplace``, ``freelist``, ``allocate``, ``output``).
    """
    g = plan.graph
    step = plan.peak_step
    timeline = [TimelineStep(i, n.name, n.op_type, "", plan.live_bytes[i] + plan.input_bytes)
                for i, n in enumerate(g.nodes)]
    live = [LiveTensor(tensor=t, bytes=g.nbytes[t], shape=list(g.shapes.get(t, ())), producer_module="(input)")
            for t in g.inputs]
    live += [LiveTensor(tensor=b.tensor, bytes=b.nbytes, shape=list(b.shape), producer_module=b.producer)
             for b in plan.live_at(step)]
    counts: dict[str, int] = {}
    for how in plan.reuse.values():
        counts[how] = counts.get(how, 0) + 1
    extra: dict[str, Any] = {
        "runtime": plan.runtime,
        "planned_peak_bytes": max(plan.live_bytes, default=0) + plan.input_bytes,
        "placements": counts,
        "buffers": [{"tensor": b.tensor, "bytes": b.nbytes, "shape": list(b.shape), "kind": b.kind,
                     "alloc_step": b.alloc_step, "free_step": b.free_step, "tensors": list(b.tensors)}
                    for b in plan.buffers],
    }
    if plan.orders_seen > 1:
        extra.update(orders_seen=plan.orders_seen, peak_range_bytes=list(plan.peak_range or ()))
    if plan.arena is not None:
        extra.update(arena_regions=list(plan.arena.regions), arena_reserved_bytes=plan.arena.reserved_bytes,
                     arena_touched_bytes=plan.arena.touched_bytes, arena_in_use_peak_bytes=plan.arena.peak_in_use_bytes)
    lts = [Lifetime(i, b.nbytes, b.alloc_step, b.free_step) for i, b in enumerate(plan.buffers)]
    return MemoryReport(
        model=g.name, input_shape=list(g.input_shapes[0]) if g.input_shapes else [], form=f"runtime={plan.runtime}",
        dtype="float32", peak_bytes=plan.peak_bytes, peak_node=g.nodes[step].name if g.nodes else "",
        live_at_peak=live, timeline=timeline, input_bytes=plan.input_bytes, param_bytes=g.param_bytes,
        activation_sum_bytes=sum(g.nbytes.get(t, 0) for n in g.nodes for t in n.outputs if t),
        method="onnxruntime CPU (optimized graph, profiled order)", order=[n.name for n in g.nodes], lifetimes=lts,
        extra=extra)


def analyze_runtime(
    model: str | Path | Any, input_shape: Sequence[int] | None = None, *, runtime: str = "ort", name: str = "",
) -> MemoryReport:
    """``memplan analyze MODEL --runtime ort``: an ONNX file as is, a PyTorch model exported first
    (:func:`memplan.export.export_onnx`, the same export as ``memplan export``).

    Example:
        >>> import tempfile, onnx
        >>> from onnx import TensorProto, helper
        >>> v = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4, 64, 64])
        >>> path = tempfile.mkdtemp() + "/t.onnx"
        >>> onnx.save(helper.make_model(helper.make_graph([helper.make_node("Tanh", ["x"], ["y"])], "g", [v("x")],
        ...                                               [v("y")])), path)
        >>> r = analyze_runtime(path, (2, 4, 64, 64))
        >>> r.form, r.peak_bytes // 2**17, [t.tensor for t in r.live_at_peak]  # input + output, 128 KiB each
        ('runtime=ort', 2, ['x', 'y', '(execution frame)'])
    """
    if runtime not in RUNTIMES:
        raise MemplanError(f"unknown runtime '{runtime}' (use {' or '.join(RUNTIMES)})")
    if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
        report = plan_report(predict_ort(model, [input_shape] if input_shape else None, runtime=runtime))
        report.model = name or str(model)
        return report
    import torch

    from memplan.export import export_onnx
    from memplan.specs import default_input, load_model

    module = load_model(model) if isinstance(model, str) else model
    shape = list(input_shape or (default_input(model) if isinstance(model, str) else (1, 3, 224, 224)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(module, torch.zeros(shape), path, random_samples=1)
        report = plan_report(predict_ort(path, [shape], runtime=runtime))
    report.model = name or (model if isinstance(model, str) else type(model).__name__)
    return report
