"""Export a (student) CNN to ONNX for deployment: export, fold BatchNorm, check, verify with onnxruntime.

:func:`export_onnx` exports the eval model as it is with the ``torch.export``-based exporter
(falling back to the legacy TorchScript exporter with a warning), folds every BatchNormalization
the exporter left after a Conv/Gemm into its weights *on the ONNX graph* (so the exported function
is the one folded: nothing is rewritten in PyTorch first), validates with ``onnx.checker`` (full
check, strict shape inference) and compares onnxruntime with the PyTorch model on random and, if
given, real inputs, relative to the output's scale. The file is written atomically and only when
the outputs agree. :func:`fold_batchnorm` folds at the module level, for analysing a deploy model.

Example:
    >>> import tempfile, torch
    >>> from memplan.zoo import create_model
    >>> res = export_onnx(create_model("resnet_tiny"), torch.zeros(1, 1, 28, 28), tempfile.mkdtemp() + "/t.onnx")
    >>> res.exporter, len(res.folded) > 0, res.max_rel_diff <= 1e-4
    ('dynamo', True, True)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import math
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from google.protobuf.message import EncodeError
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights
from torch.utils import _pytree as pytree

from memplan.capture import META_KEY, capture
from memplan.errors import MemplanError, describe_error
from memplan.graph import op_kind
from memplan.io import check_destination, publish

__all__ = ["ExportResult", "ParityCheck", "export_onnx", "fold_batchnorm", "fold_batchnorm_onnx", "supported_opsets"]

DEFAULT_TOLERANCE = 1e-4  # on |onnxruntime - PyTorch| / max(1, max |PyTorch output|)


@dataclass(frozen=True)
class ParityCheck:
    """onnxruntime vs PyTorch on one set of inputs: the largest absolute output difference, and the
    largest difference relative to its output's scale, ``|Δ| / max(1, max |output|)``."""

    inputs: str  # "random" or "real"
    samples: int
    max_abs_diff: float
    max_rel_diff: float = 0.0
    output_scale: float = 0.0  # max |PyTorch output| over all outputs
    fp32_noise: float = 0.0  # PyTorch fp32 vs fp64, relative like max_rel_diff (measured when above tolerance)


@dataclass
class ExportResult:
    """What :func:`export_onnx` did: file, exporter, folded (conv, bn) pairs and parity checks."""

    path: Path
    exporter: str  # "dynamo" (torch.export-based) or "legacy" (TorchScript)
    opset: int
    dynamic_batch: bool
    folded: list[tuple[str, str]]
    parity: list[ParityCheck]
    tolerance: float = DEFAULT_TOLERANCE
    warnings: list[str] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        """The worst absolute difference over all parity checks."""
        return max((p.max_abs_diff for p in self.parity), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        """The worst difference relative to the output scale over all parity checks (what passes)."""
        return max((p.max_rel_diff for p in self.parity), default=0.0)

    def summary(self) -> str:
        """The lines ``memplan export`` prints."""
        lines = [
            f"wrote {self.path}  ({self.path.stat().st_size / 2**20:.2f} MiB, opset {self.opset}, "
            f"{self.exporter} exporter{', dynamic batch' if self.dynamic_batch else ''})",
            f"BatchNorm folded into conv/linear: {len(self.folded)}",
            "onnx.checker: ok (full check)",
        ]
        lines += [
            f"onnxruntime parity, {p.inputs} inputs ({p.samples} samples): max |diff| = {p.max_abs_diff:.3g}, "
            f"relative to the output scale ({p.output_scale:.3g}) = {p.max_rel_diff:.3g}  (tolerance {self.tolerance:g}"
            + (f", or {NOISE_FACTOR}x PyTorch's own fp32-vs-fp64 difference {p.fp32_noise:.3g}" if p.fp32_noise else "")
            + ")"
            for p in self.parity
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _as_tuple(inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def _traced(
    model: nn.Module, example_inputs: Sequence[torch.Tensor]
) -> tuple[torch.fx.GraphModule, dict[torch.fx.Node, str]]:
    """A graph of ``model`` (torch.fx, else memplan's capture with its torch.export fallback) and each
    call node's module path."""
    try:
        gm = torch.fx.symbolic_trace(model)
        return gm, {n: str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    except Exception:  # noqa: BLE001 - not fx-traceable: capture falls back to torch.export
        meta = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in example_inputs]
        gm = capture(model, meta).gm
        return gm, {n: n.meta[META_KEY].module for n in gm.graph.nodes if META_KEY in n.meta}


def fold_batchnorm(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]
) -> tuple[nn.Module, list[tuple[str, str]]]:
    """An eval copy of ``model`` with each BatchNorm that solely consumes a conv/linear folded into it.

    The pairs are found on the traced graph, so the copy keeps its module tree and forward code:
    the conv/linear gets the folded weights and the BN becomes ``nn.Identity``. Returns the copy and
    the folded ``(conv, bn)`` module paths. Only modules whose forward is torch.nn's own are
    touched: a BN subclass that also applies an activation (timm's ``BatchNormAct2d``) or a conv
    that rewrites its weight on the fly (weight standardisation, a parametrization) would compute
    something else after the swap, so they are left as they are.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        >>> folded, pairs = fold_batchnorm(net, torch.zeros(1, 3, 8, 8))
        >>> pairs, folded[1]
        ([('0', '1')], Identity())
    """
    folded = copy.deepcopy(model).eval()
    gm, module_of = _traced(folded, _as_tuple(example_inputs))
    calls = Counter(path for n, path in module_of.items() if op_kind(n, gm) in ("conv", "linear", "bn"))
    modules = dict(folded.named_modules())
    pairs: list[tuple[str, str]] = []
    for n in gm.graph.nodes:
        src = n.args[0] if n.op in ("call_module", "call_function") and n.args else None
        if (
            not isinstance(src, torch.fx.Node)
            or len(src.users) != 1
            or op_kind(n, gm) != "bn"
            or op_kind(src, gm) not in ("conv", "linear")
        ):
            continue
        conv, bn = modules.get(module_of.get(src, "")), modules.get(module_of.get(n, ""))
        if not (
            isinstance(conv, (nn.modules.conv._ConvNd, nn.Linear))
            and isinstance(bn, nn.modules.batchnorm._BatchNorm)
            and _runs_as_written(conv)
            and _runs_as_written(bn)
            and bn.track_running_stats
            and calls[module_of[src]] == 1
            and calls[module_of[n]] == 1
        ):
            continue
        if isinstance(conv, nn.Linear):
            conv.weight, conv.bias = fuse_linear_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
        else:
            conv.weight, conv.bias = fuse_conv_bn_weights(
                conv.weight,
                conv.bias,
                bn.running_mean,
                bn.running_var,
                bn.eps,
                bn.weight,
                bn.bias,
                transpose=isinstance(conv, nn.modules.conv._ConvTransposeNd),
            )
        folded.set_submodule(module_of[n], nn.Identity())
        pairs.append((module_of[src], module_of[n]))
    return folded, pairs


def _runs_as_written(module: nn.Module) -> bool:
    """Whether ``module`` computes torch.nn's own forward from its own parameters."""
    forward = getattr(type(module).forward, "__module__", "") or ""
    return forward.startswith("torch.nn.") and not parametrize.is_parametrized(module)


_FOLDABLE = ("Conv", "ConvTranspose", "Gemm")
_EXPORTER_FOLDS = "pkg.onnxscript.rewriter.rule_name"  # the dynamo exporter's own BN fusions are marked


def fold_batchnorm_onnx(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """Fold, in place, every inference BatchNormalization whose input is a Conv/ConvTranspose/Gemm
    output that nothing else reads into that op's (initializer) weights; returns the ``(conv, bn)``
    module paths (node names where the file has no module paths), including the BNs the exporter
    fused itself.

    Working on the exported graph keeps the function exact whatever the PyTorch modules do.

    Example:
        >>> import numpy as np
        >>> from onnx import TensorProto, helper, numpy_helper
        >>> inits = [numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w")] + [
        ...     numpy_helper.from_array(np.array(v, np.float32), n)
        ...     for n, v in [("g", [2, 2]), ("b", [1, 1]), ("mu", [0, 0]), ("var", [1, 1])]]
        >>> m = helper.make_model(helper.make_graph(
        ...     [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        ...      helper.make_node("BatchNormalization", ["c", "g", "b", "mu", "var"], ["y"], name="bn", epsilon=0.0)],
        ...     "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])], inits))
        >>> fold_batchnorm_onnx(m), [n.op_type for n in m.graph.node], list(m.graph.node[0].input)
        ([('conv', 'bn')], ['Conv'], ['x', 'w', 'bn.bias'])
    """
    from onnx import numpy_helper

    from memplan.onnx_frontend import _module_of

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers = Counter([t for n in g.node for t in n.input] + [o.name for o in g.output] * 2)
    producer = {t: n for n in g.node for t in n.output}
    pairs = [(n.input[1].removesuffix(".weight") if len(n.input) > 1 else n.name, _module_of(n) or n.name)
             for n in g.node if n.op_type in _FOLDABLE and any(p.key == _EXPORTER_FOLDS and "BatchNorm" in p.value
                                                                for p in n.metadata_props)]
    dead = []
    for bn in g.node:
        conv = producer.get(bn.input[0]) if bn.op_type == "BatchNormalization" else None
        if conv is None or conv.op_type not in _FOLDABLE or readers[bn.input[0]] != 1 or any(bn.output[1:]):
            continue
        attrs = {**_attrs(conv), **_attrs(bn)}
        if (attrs.get("training_mode", 0) or not all(t in inits and readers[t] == 1 for t in conv.input[1:])
                or not all(t in inits for t in bn.input[1:5])
                or (conv.op_type == "ConvTranspose" and attrs.get("group", 1) != 1)
                or (conv.op_type == "Gemm" and attrs.get("transA", 0))):
            continue
        w = numpy_helper.to_array(inits[conv.input[1]])
        gamma, beta, mean, var = (numpy_helper.to_array(inits[t]).astype(np.float64) for t in bn.input[1:5])
        scale = gamma / np.sqrt(var + attrs.get("epsilon", 1e-5))
        axis = {"Conv": 0, "ConvTranspose": 1, "Gemm": 0 if attrs.get("transB", 0) else 1}[conv.op_type]
        shape = [1] * w.ndim
        shape[axis] = -1
        bias = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2]
                else np.zeros(scale.shape))
        if conv.op_type == "Gemm":  # alpha * A @ B + beta * C: the new C absorbs beta
            bias = bias * attrs.get("beta", 1.0)
            _set_attr(conv, "beta", 1.0)
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array(
            (w.astype(np.float64) * scale.reshape(shape)).astype(w.dtype), conv.input[1]))
        new_bias = (bias * scale + beta - mean * scale).astype(w.dtype)
        bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else f"{bn.name or bn.output[0]}.bias"
        if bias_name in inits:
            inits[bias_name].CopyFrom(numpy_helper.from_array(new_bias, bias_name))
        else:
            g.initializer.append(numpy_helper.from_array(new_bias, bias_name))
            inits[bias_name] = g.initializer[-1]
            del conv.input[2:]
            conv.input.append(bias_name)
        conv.output[0] = bn.output[0]
        dead.append(bn)
        pairs.append((_module_of(conv) or conv.name, _module_of(bn) or bn.name))
    for bn in dead:
        g.node.remove(bn)
    used = {t for n in g.node for t in n.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    return pairs


def fold_pads_onnx(model: onnx.ModelProto) -> int:
    """Fold, in place, each constant Pad of the spatial axes into the Convs (pad value 0) and
    MaxPools (pad value -inf, floor mode) that are its only readers, as their own ``pads``; returns
    how many Pads went. A patched model pads each border patch explicitly: as separate Pads they
    copy the map, and an int8 runtime keeps a -inf Pad in float.

    Example:
        >>> import numpy as np
        >>> from onnx import TensorProto, helper, numpy_helper
        >>> inits = [numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 0, 0, 2], np.int64), "p"),
        ...          numpy_helper.from_array(np.array(-np.inf, np.float32), "v")]
        >>> m = helper.make_model(helper.make_graph(
        ...     [helper.make_node("Pad", ["x", "p", "v"], ["xp"]),
        ...      helper.make_node("MaxPool", ["xp"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
        ...     "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 5, 5])], inits))
        >>> fold_pads_onnx(m), [n.op_type for n in m.graph.node], helper.get_attribute_value(m.graph.node[0].attribute[-1])
        (1, ['MaxPool'], [2, 1, 1, 3])
    """
    from onnx import numpy_helper

    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    outputs = {o.name for o in g.output}
    folded = []
    for pad in g.node:
        attrs = _attrs(pad)
        if (pad.op_type != "Pad" or attrs.get("mode", b"constant") not in (b"constant", "constant")
                or len(pad.input) < 2 or pad.input[1] not in consts or (len(pad.input) > 3 and pad.input[3])
                or pad.output[0] in outputs):
            continue
        given = pad.input[2] if len(pad.input) > 2 else ""  # the pad value: absent = 0, not constant = unknown
        value = float(consts[given].reshape(-1)[0]) if given in consts else None if given else 0.0
        pads = [int(v) for v in consts[pad.input[1]].reshape(-1)]
        rank = len(pads) // 2
        users = readers.get(pad.output[0], [])
        if value is None or rank < 3 or any(v < 0 for v in pads) or any(pads[i] or pads[rank + i] for i in (0, 1)):
            continue
        if not users or not all(_absorbs_pad(u, pad.output[0], value) for u in users):
            continue
        spatial = rank - 2
        for u in users:
            own = list(_attrs(u).get("pads", [0] * 2 * spatial))
            _set_attr(u, "pads", [own[i] + pads[2 + i] for i in range(spatial)]
                      + [own[spatial + i] + pads[rank + 2 + i] for i in range(spatial)])
            u.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        g.node.remove(pad)
    used = {t for n in g.node for t in n.input}
    for t in [t for t in g.initializer if t.name not in used and any(t.name in p.input for p in folded)]:
        g.initializer.remove(t)
    return len(folded)


def _absorbs_pad(node: onnx.NodeProto, padded: str, value: float) -> bool:
    """Whether ``node`` computes the same from ``padded``'s unpadded input with the pad in its ``pads``."""
    a = _attrs(node)
    if node.input[0] != padded or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return False
    return ((node.op_type == "Conv" and value == 0.0)
            or (node.op_type == "MaxPool" and value == -math.inf and not a.get("ceil_mode", 0)))


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def supported_opsets() -> range:
    """The ONNX opsets torch.onnx exports (its own limits, capped by the installed onnx).

    Example:
        >>> 17 in supported_opsets() and 6 not in supported_opsets()
        True
    """
    from torch.onnx import _constants

    top = min(getattr(_constants, "ONNX_MAX_OPSET", 20), onnx.defs.onnx_opset_version())
    return range(getattr(_constants, "ONNX_MIN_OPSET", 7), top + 1)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' progress logging and deprecation chatter (errors still raise)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _export(
    model: nn.Module, args: tuple[torch.Tensor, ...], tmp: Path, opset: int | None, dynamic_batch: bool
) -> tuple[str, list[str], onnx.ModelProto]:
    """Export with the dynamo exporter, else the legacy one (which writes ``tmp``); returns
    (exporter, warnings, model)."""
    names = ["input"] if len(args) == 1 else [f"input{i}" for i in range(len(args))]
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                model,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=names,
                verbose=False,
                dynamic_shapes=tuple({0: "batch"} for _ in args) if dynamic_batch else None,
            )
            got = next(
                (o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")), 0
            )
            if opset is not None and got != opset:
                raise RuntimeError(f"it produced opset {got}, not the requested {opset}")
            proto = program.model_proto
        return "dynamo", [], proto
    except Exception as e:  # noqa: BLE001 - any exporter failure triggers the documented fallback
        reason = (
            f"torch.export-based ONNX exporter failed ({describe_error(e)[:300]}); "
            "fell back to the legacy TorchScript exporter"
        )
    warnings.warn(reason, stacklevel=3)
    try:
        with _quiet_exporter():
            torch.onnx.export(
                model,
                args,
                str(tmp),
                dynamo=False,
                opset_version=opset or 17,
                input_names=names,
                dynamic_axes={n: {0: "batch"} for n in names} if dynamic_batch else None,
            )
    except Exception as e:  # noqa: BLE001
        raise MemplanError(
            f"ONNX export failed with both exporters ({reason}; legacy: {describe_error(e)[:300]})"
        ) from e
    return "legacy", [reason], onnx.load(str(tmp))


def _max_diff(
    model: nn.Module, session: object, batches: Sequence[tuple[torch.Tensor, ...]]
) -> tuple[float, float, float]:
    """(max |Δ|, max |Δ| / max(1, max |output|) per output, max |output|) over ``batches``."""
    names = [i.name for i in session.get_inputs()]
    worst = rel = scale = 0.0
    with torch.no_grad():
        for args in batches:
            ref = [
                t.detach().float().numpy()
                for t in pytree.tree_leaves(model(*args))
                if isinstance(t, torch.Tensor)
            ]
            got = session.run(None, {n: a.numpy() for n, a in zip(names, args)})
            if len(got) != len(ref):
                raise MemplanError(f"onnxruntime returned {len(got)} outputs, PyTorch {len(ref)}")
            for r, o in zip(ref, got):
                if r.shape != o.shape:
                    raise MemplanError(f"output shape differs: PyTorch {r.shape} vs onnxruntime {o.shape}")
                same = (r == o) | (np.isnan(r) & np.isnan(o))  # equal infinities and NaNs agree
                d = np.nan_to_num(np.where(same, 0.0, np.abs(r.astype(np.float64) - o)), nan=np.inf)
                diff = float(np.max(d, initial=0.0))
                size = float(np.max(np.abs(r[np.isfinite(r)]), initial=0.0))
                worst, scale = max(worst, diff), max(scale, size)
                rel = max(rel, diff / max(1.0, size))
    return worst, rel, scale


NOISE_FACTOR = 4  # onnxruntime may differ from PyTorch by this many times PyTorch's own fp32 rounding


def _fp32_noise(model: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]]) -> float:
    """How far PyTorch's own fp32 outputs are from the same model in fp64, relative like
    :func:`_max_diff` (0.0 when the model does not run in fp64): the rounding an fp32 runtime
    cannot avoid. A randomly initialised deep net amplifies it far beyond one ulp."""
    try:
        wide = copy.deepcopy(model).double()
        rel = 0.0
        with torch.no_grad():
            for args in batches:
                narrow = [t for t in pytree.tree_leaves(model(*args)) if isinstance(t, torch.Tensor)]
                exact = [t for t in pytree.tree_leaves(wide(*(a.double() if a.is_floating_point() else a
                                                              for a in args))) if isinstance(t, torch.Tensor)]
                for a, b in zip(narrow, exact):
                    scale = float(a.detach().abs().max()) if a.numel() else 0.0
                    rel = max(rel, float((a.double() - b).abs().max()) / max(1.0, scale))
        return rel if math.isfinite(rel) else 0.0
    except Exception:  # noqa: BLE001 - a model without fp64 kernels: no allowance
        return 0.0


def _batches_of(real: torch.Tensor, batch: int | None) -> list[tuple[torch.Tensor]]:
    """Split real samples into model inputs: chunks of the exported (static) batch, else one batch."""
    if batch is None:
        return [(real,)]
    if real.shape[0] < batch:
        raise MemplanError(f"{real.shape[0]} real sample(s) do not fill one batch of {batch}")
    return [(real[i : i + batch],) for i in range(0, real.shape[0] - batch + 1, batch)]


PROTOBUF_LIMIT = 2**31 - 1  # bytes: a larger model keeps its weights in an external data file


def _over_protobuf_limit(proto: onnx.ModelProto) -> bool:
    try:
        return proto.ByteSize() >= PROTOBUF_LIMIT
    except EncodeError:  # protobuf cannot even size a message past 2 GiB
        return True


def _write_checked(proto: onnx.ModelProto, tmp: Path) -> list[Path]:
    """Write ``proto`` to ``tmp`` after ``onnx.checker``; returns the files written, data first. A model
    over protobuf's 2 GiB limit (ViT-H, RegNetY-128GF) stores its tensors in ``<name>.data`` beside it
    (ONNX external data, which onnxruntime and ``onnx.load`` read)."""
    try:
        if not _over_protobuf_limit(proto):
            data = proto.SerializeToString()  # once: the checker and the file share it (100 MB for ResNet-50)
            onnx.checker.check_model(data, full_check=True)
            tmp.write_bytes(data)
            return [tmp]
        weights = tmp.with_name(tmp.name + ".data")
        onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=weights.name, size_threshold=1024)
        onnx.checker.check_model(str(tmp), full_check=True)
        return [weights, tmp]
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise MemplanError(f"exported model fails onnx.checker: {describe_error(e)}") from e


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | Path,
    *,
    opset: int | None = None,
    dynamic_batch: bool = False,
    real_inputs: torch.Tensor | None = None,
    random_samples: int = 2,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    fold_pads: bool = False,
) -> ExportResult:
    """Export ``model`` to ``path``, fold BN, check it and verify onnxruntime parity (docs/definitions.md §2,
    deploy form).

    ``real_inputs`` is a batch of real samples for a single-input model (shape ``(N, *sample)``).
    Parity passes when max |Δ| / max(1, max |output|) ≤ ``tolerance`` on every output: absolute
    for outputs of order one, relative to the scale of larger ones (a randomly initialised deep net's
    logits reach 1e3–1e12, where fp32 rounding alone exceeds any fixed absolute bound), or ≤
    :data:`NOISE_FACTOR` times PyTorch's own fp32-vs-fp64 difference on the same inputs when that is
    larger and ``tolerance`` is positive (a random deep net amplifies rounding; recorded as
    ``fp32_noise``). Raises
    :class:`MemplanError` (and leaves ``path`` untouched) if the opset is not supported, export, the
    checker or parity fails. ``opset`` None = the exporter's default. ``fold_pads`` also folds explicit
    constant Pads into the Convs and MaxPools that read them (:func:`fold_pads_onnx`; a patched model's
    border pads), which the PyTorch-side deploy form still counts as copies.

    Example:
        >>> import tempfile, torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        >>> r = export_onnx(net, torch.zeros(1, 3, 8, 8), tempfile.mkdtemp() + "/n.onnx", dynamic_batch=True)
        >>> [p.inputs for p in r.parity], r.folded
        (['random'], [('0', '1')])
    """
    import onnxruntime as ort

    if opset is not None and opset not in supported_opsets():
        ops = supported_opsets()
        raise MemplanError(f"opset {opset} is not supported (torch.onnx exports opsets {ops.start}-{ops.stop - 1})")
    path = check_destination(path)
    args = _as_tuple(example_inputs)
    was_training = model.training
    model.eval()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.stem}."))
        tmp = stage / path.name
        try:
            exporter, notes, proto = _export(model, tuple(a.detach() for a in args), tmp, opset, dynamic_batch)
            pairs = fold_batchnorm_onnx(proto)
            if fold_pads:
                fold_pads_onnx(proto)
            files = _write_checked(proto, tmp)
            for f in files:
                check_destination(path.parent / f.name)
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            gen = torch.Generator().manual_seed(seed)
            batch = 3 if dynamic_batch else None
            random = [
                tuple(
                    torch.randn((batch or a.shape[0], *a.shape[1:]), generator=gen).to(a.dtype) for a in args
                )
                for _ in range(random_samples)
            ]
            parity = [ParityCheck("random", random_samples, *_max_diff(model, session, random))]
            if real_inputs is not None:
                if len(args) != 1:
                    raise MemplanError("real inputs are supported for single-input models only")
                real = _batches_of(real_inputs.to(args[0].dtype), None if dynamic_batch else args[0].shape[0])
                parity.append(ParityCheck("real", int(real_inputs.shape[0]), *_max_diff(model, session, real)))
            worst = max(p.max_rel_diff for p in parity)
            if not worst <= tolerance:  # allow what PyTorch's own fp32 rounding is from fp64
                parity[0] = dataclasses.replace(parity[0], fp32_noise=_fp32_noise(model, random))
            # a tolerance of 0 (or below) asks for exactly that: no allowance
            allowed = max(tolerance, NOISE_FACTOR * parity[0].fp32_noise) if tolerance > 0 else tolerance
            if not worst <= allowed:
                each = ", ".join(f"{p.inputs}: max |diff| {p.max_abs_diff:.3g}, scale {p.output_scale:.3g}"
                                 for p in parity)
                raise MemplanError(f"onnxruntime output differs from PyTorch by {worst:.3g} > {allowed:.3g} "
                                   f"relative to the output scale ({each}; PyTorch fp32 vs fp64: "
                                   f"{parity[0].fp32_noise:.3g}); {path} not written")
            opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
            for f in files:  # the weights first: the model file appears only once its data is in place
                publish(f, path.parent / f.name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    finally:
        model.train(was_training)
    return ExportResult(
        path=path,
        exporter=exporter,
        opset=opset_used,
        dynamic_batch=dynamic_batch,
        folded=pairs,
        parity=parity,
        tolerance=tolerance,
        warnings=notes,
    )
