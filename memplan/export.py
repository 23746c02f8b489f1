"""Export a (student) CNN to ONNX for deployment: fold BatchNorm, export, check, verify with onnxruntime.

:func:`export_onnx` folds every eval BatchNorm that directly follows a conv/linear into it (on a
copy; RED blocks' BNs included), exports with the ``torch.export``-based exporter (falling back to
the legacy TorchScript exporter with a warning), validates with ``onnx.checker`` (full check,
strict shape inference) and compares onnxruntime with the original PyTorch model on random and,
if given, real inputs. The file is written atomically and only when the outputs agree.

Example:
    >>> import tempfile, torch
    >>> from memplan.zoo import create_model
    >>> res = export_onnx(create_model("resnet_tiny"), torch.zeros(1, 1, 28, 28), tempfile.mkdtemp() + "/t.onnx")
    >>> res.exporter, len(res.folded) > 0, res.max_abs_diff <= 1e-4
    ('dynamo', True, True)
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights
from torch.utils import _pytree as pytree

from memplan.capture import META_KEY, capture
from memplan.errors import MemplanError, describe_error
from memplan.graph import op_kind

__all__ = ["ExportResult", "ParityCheck", "export_onnx", "fold_batchnorm"]

DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ParityCheck:
    """onnxruntime vs PyTorch on one set of inputs: the largest absolute output difference."""

    inputs: str  # "random" or "real"
    samples: int
    max_abs_diff: float


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
        """The worst difference over all parity checks."""
        return max((p.max_abs_diff for p in self.parity), default=0.0)

    def summary(self) -> str:
        """The lines ``memplan export`` prints."""
        lines = [
            f"wrote {self.path}  ({self.path.stat().st_size / 2**20:.2f} MiB, opset {self.opset}, "
            f"{self.exporter} exporter{', dynamic batch' if self.dynamic_batch else ''})",
            f"BatchNorm folded into conv/linear: {len(self.folded)}",
            "onnx.checker: ok (full check)",
        ]
        lines += [
            f"onnxruntime parity, {p.inputs} inputs ({p.samples} samples): max |diff| = {p.max_abs_diff:.3g}"
            f"  (tolerance {self.tolerance:g})"
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
    the folded ``(conv, bn)`` module paths.

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
) -> tuple[str, list[str]]:
    """Export to ``tmp`` with the dynamo exporter, else the legacy one; returns (exporter, warnings)."""
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
            program.save(str(tmp), external_data=False)
        return "dynamo", []
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
    return "legacy", [reason]


def _max_diff(model: nn.Module, session: object, batches: Sequence[tuple[torch.Tensor, ...]]) -> float:
    names = [i.name for i in session.get_inputs()]
    worst = 0.0
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
                worst = max(worst, float(np.max(np.abs(r - o), initial=0.0)))
    return worst


def _batches_of(real: torch.Tensor, batch: int | None) -> list[tuple[torch.Tensor]]:
    """Split real samples into model inputs: chunks of the exported (static) batch, else one batch."""
    if batch is None:
        return [(real,)]
    if real.shape[0] < batch:
        raise MemplanError(f"{real.shape[0]} real sample(s) do not fill one batch of {batch}")
    return [(real[i : i + batch],) for i in range(0, real.shape[0] - batch + 1, batch)]


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
) -> ExportResult:
    """Fold BN, export ``model`` to ``path``, check it and verify onnxruntime parity (docs/definitions.md §2, deploy form).

    ``real_inputs`` is a batch of real samples for a single-input model (shape ``(N, *sample)``).
    Raises :class:`MemplanError` (and leaves ``path`` untouched) if export, the checker or parity
    (max |Δ| > ``tolerance``) fails. ``opset`` None = the exporter's default.

    Example:
        >>> import tempfile, torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        >>> r = export_onnx(net, torch.zeros(1, 3, 8, 8), tempfile.mkdtemp() + "/n.onnx", dynamic_batch=True)
        >>> [p.inputs for p in r.parity], r.folded
        (['random'], [('0', '1')])
    """
    import onnxruntime as ort

    path = Path(path)
    args = _as_tuple(example_inputs)
    was_training = model.training
    model.eval()
    try:
        folded, pairs = fold_batchnorm(model, args)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".onnx")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            exporter, notes = _export(folded, tuple(a.detach() for a in args), tmp, opset, dynamic_batch)
            proto = onnx.load(str(tmp))
            try:
                onnx.checker.check_model(proto, full_check=True)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
                raise MemplanError(f"exported model fails onnx.checker: {describe_error(e)}") from e
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            gen = torch.Generator().manual_seed(seed)
            batch = 3 if dynamic_batch else None
            random = [
                tuple(
                    torch.randn((batch or a.shape[0], *a.shape[1:]), generator=gen).to(a.dtype) for a in args
                )
                for _ in range(random_samples)
            ]
            parity = [ParityCheck("random", random_samples, _max_diff(model, session, random))]
            if real_inputs is not None:
                if len(args) != 1:
                    raise MemplanError("real inputs are supported for single-input models only")
                real = _batches_of(real_inputs.to(args[0].dtype), None if dynamic_batch else args[0].shape[0])
                parity.append(ParityCheck("real", int(real_inputs.shape[0]), _max_diff(model, session, real)))
            worst = max(p.max_abs_diff for p in parity)
            if worst > tolerance:
                raise MemplanError(
                    f"onnxruntime output differs from PyTorch by {worst:.3g} > {tolerance:g} "
                    f"({', '.join(f'{p.inputs} {p.max_abs_diff:.3g}' for p in parity)}); "
                    f"{path} not written"
                )
            opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
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
