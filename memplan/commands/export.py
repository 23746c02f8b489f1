"""``memplan export MODEL_OR_RUN --out model.onnx``: BN-folded ONNX, checked, with onnxruntime parity."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch

from memplan.cli import command
from memplan.errors import MemplanError
from memplan.io import load_torch
from memplan.specs import default_input, load_model, parse_shape


def _real_inputs(path: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Samples from a ``.npy`` array or a ``.pt`` tensor, shaped ``(N, *shape[1:])``."""
    if path.endswith(".npy"):
        try:
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise MemplanError(f"cannot read real inputs '{path}': {type(e).__name__}: {e}") from None
    else:
        data = load_torch(path, "real inputs")
    if not isinstance(data, torch.Tensor) or not data.is_floating_point():
        raise MemplanError(f"real inputs '{path}' must hold one floating-point array of samples (N, C, H, W)")
    if data.dim() != len(shape) or tuple(data.shape[1:]) != tuple(shape[1:]) or len(data) == 0:
        want = "x".join(map(str, ("N", *shape[1:])))
        raise MemplanError(f"real inputs '{path}' have shape {'x'.join(map(str, data.shape))}; the model takes {want}")
    return data.float()


@command("export", "export a model or a distilled student to ONNX (BN folded), checked against onnxruntime")
def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``memplan export``."""
    p.add_argument("model", help="a model spec (zoo:NAME, FILE.py:CALLABLE, ...) or a run directory of memplan "
                                 "train, distill, student or pipeline")
    p.add_argument("--trust-code", action="store_true", help="let a run directory's config.yaml name code "
                                                             "(FILE.py:fn, pkg.mod:fn)")
    p.add_argument("--out", required=True, metavar="PATH.onnx", help="where to write the model")
    p.add_argument("--input", default=None, help="input shape, e.g. 1,3,224,224 (default: the model's)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension dynamic")
    p.add_argument("--real", metavar="FILE", help="real samples (.npy or .pt, shape N,C,H,W) for the parity check")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |onnxruntime - PyTorch| allowed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``memplan export``."""
    from distill.run import RunDir
    from memplan.export import export_onnx

    if Path(args.model).is_dir():
        run = RunDir.open(args.model)
        model, shape = run.load_model(trust_code=args.trust_code), run.input_shape()
    else:
        model, shape = load_model(args.model), default_input(args.model)
    shape = parse_shape(args.input) if args.input else shape
    real = _real_inputs(args.real, shape) if args.real else None
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():  # the exporter fallback warning is part of the summary
        warnings.simplefilter("ignore", UserWarning)
        result = export_onnx(model, x, args.out, opset=args.opset, dynamic_batch=args.dynamic_batch,
                             real_inputs=real, tolerance=args.tolerance)
    print(result.summary())
    return 0
