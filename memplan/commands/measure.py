"""``memplan measure MODEL|FILE.onnx``: measured peak activation memory next to the theoretical one."""

from __future__ import annotations

import argparse

from memplan.cli import command
from memplan.io import write_json
from memplan.specs import parse_shape


@command("measure", "measured peak activation memory (PyTorch CPU/CUDA, onnxruntime) next to the theory")
def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``memplan measure``."""
    p.add_argument("model", help="a model spec (zoo:NAME, FILE.py:CALLABLE, ...) or FILE.onnx")
    p.add_argument("--input", default=None, help="input shape, e.g. 1,3,224,224 (default: the model's)")
    p.add_argument("--runs", type=int, default=10, help="onnxruntime runs for the median latency")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = its default)")
    p.add_argument("--json", metavar="PATH", help="write the measurements as JSON ('-' = stdout)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``memplan measure``."""
    from memplan.measure import measure

    shape = parse_shape(args.input) if args.input else None
    report = measure(args.model, shape, runs=args.runs, threads=args.threads)
    if args.json != "-":
        print(report.format())
    if args.json:
        write_json(report.to_json(), args.json)
    return 0
