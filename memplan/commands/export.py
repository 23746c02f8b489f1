"""``memplan export MODEL_OR_RUN --out model.onnx``: BN-folded ONNX, checked, with onnxruntime parity."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from memplan.cli import command
from memplan.errors import MemplanError
from memplan.io import check_destination, load_torch
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
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's; unsupported ones are refused)")
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension dynamic")
    p.add_argument("--real", metavar="FILE", help="real samples (.npy or .pt, shape N,C,H,W) for the parity check")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max |onnxruntime - PyTorch| / max(1, max |output|) allowed (relative to the output scale)")
    p.add_argument("--int8", action="store_true", help="write a static int8 (QDQ, per-channel) model calibrated on "
                                                       "--calib (onnxruntime's quantization tools)")
    p.add_argument("--calib", metavar="DATA_SPEC", help="with --int8: calibration data (its validation split; the "
                                                        "parity check uses test images), e.g. digits, fashion-mnist")
    p.add_argument("--calib-samples", type=int, default=256, help="with --int8: calibration images (default 256)")
    p.add_argument("--int8-input", action="store_true",
                   help="with --int8: the file takes the uint8 image (its input QuantizeLinear removed; scale and "
                        "zero point in the summary and the file's metadata), 1 byte per pixel resident")
    p.set_defaults(func=run)


def _calibration(spec: str, shape: tuple[int, ...], samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, check) float32 arrays: preprocessed validation and test images of ``spec`` at ``shape``."""
    from distill.data import load_data

    if samples < 1:
        raise MemplanError(f"--calib-samples must be >= 1, got {samples}")
    bundle = load_data(spec, image_size=shape[-1] if len(shape) == 4 else None)
    if (bundle.in_chans, *bundle.input_size) != tuple(shape[1:]):
        raise MemplanError(f"--calib {spec} gives {bundle.in_chans}x{'x'.join(map(str, bundle.input_size))} images; "
                           f"the model takes {'x'.join(map(str, shape[1:]))}")
    calib = bundle.preprocess(bundle.val.images[:samples], train=False)
    check = bundle.preprocess(bundle.test.images[: max(64, min(samples, 512))], train=False)
    return calib.numpy().astype(np.float32), check.numpy().astype(np.float32)


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
    if args.int8 != bool(args.calib):
        raise MemplanError("--int8 needs --calib DATA_SPEC (and --calib only applies with --int8)")
    if args.int8_input and not args.int8:
        raise MemplanError("--int8-input only applies with --int8")
    check_destination(args.out)
    calib = _calibration(args.calib, shape, args.calib_samples) if args.int8 else None
    real = _real_inputs(args.real, shape) if args.real else None
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with contextlib.ExitStack() as stack:
        fp32 = args.out
        if calib is not None:  # the fp32 export is an intermediate next to the output
            fp32 = stack.enter_context(tempfile.TemporaryDirectory(dir=Path(args.out).resolve().parent)) + "/fp32.onnx"
        with warnings.catch_warnings():  # the exporter fallback warning is part of the summary
            warnings.simplefilter("ignore", UserWarning)
            result = export_onnx(model, x, fp32, opset=args.opset, dynamic_batch=args.dynamic_batch,
                                 real_inputs=real if real is not None else None if calib is None else
                                 torch.from_numpy(calib[1][:16]), tolerance=args.tolerance)
        print(result.summary())
        if calib is not None:
            from memplan.quantize import quantize_onnx

            print(quantize_onnx(fp32, args.out, *calib, integer_input=args.int8_input).summary())
    return 0
