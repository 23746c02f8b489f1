"""``memplan pipeline MODEL --data SPEC (--factor K | --budget B) --out RUN``: teacher to deployed student.

Trains the teacher (unless ``--teacher`` gives a run directory of ``memplan train``, or a checkpoint
in one), derives the aggressive-pooling student, distils it (``--method``, default ``red``),
exports both to ONNX with onnxruntime parity on real validation images, analyses and measures
them, and writes ``RUN/report.md``, ``RUN/report.json``, ``RUN/student.onnx``, ``RUN/teacher.onnx``
and the timeline plots (:mod:`memplan.pipeline`). Re-running with the same ``--out`` reuses
finished training runs and continues interrupted ones.

Example:
    $ memplan pipeline zoo:resnet_tiny --data digits --factor 2 --input 1,1,32,32 --out runs/digits
    $ memplan pipeline zoo:resnet_tiny --data digits --budget 96KiB --teacher runs/digits/teacher --out runs/b
"""

from __future__ import annotations

import argparse
import logging

from memplan.cli import allow_intermixed, command
from memplan.commands.student import add_patch_arguments
from memplan.report import parse_bytes
from memplan.specs import parse_shape


@command("pipeline", "train a teacher, derive and distil its student, export, measure and report (resumable)")
def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``memplan pipeline``."""
    p.add_argument("model", help="teacher architecture: zoo:NAME, FILE.py:CALLABLE or pkg.module:CALLABLE")
    p.add_argument("--data", required=True, help="data spec: digits, fashion-mnist[:DIR], cifar10:DIR, ... "
                                                 "(as memplan train)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--factor", type=int, help="k: the student's stem downsamples k times more (2, 4 or 8)")
    how.add_argument("--budget", help="the least aggressive student whose deployed peak (RED blocks included) "
                                      "fits, e.g. 96KiB, 1.5MiB, 800000")
    p.add_argument("--out", required=True, metavar="RUN", help="output directory (teacher/, student/, report.md, "
                                                               "report.json, *.onnx, *_timeline.png)")
    p.add_argument("--teacher", metavar="CKPT_OR_RUN", help="a trained teacher: run directory of memplan train, "
                                                            "or a checkpoint in one (default: train it)")
    p.add_argument("--method", default="red", help="distillation method(s): red, red+kd, kd, at, fitnet, "
                                                   "red-blocks, none (default red)")
    p.add_argument("--epochs", type=int, default=10, help="student epochs (default 10)")
    p.add_argument("--teacher-epochs", type=int, help="teacher epochs (default: --epochs)")
    p.add_argument("--input", help="deploy input N,C,H,W that is analysed, measured and exported; H sets the "
                                   "training image size (default: batch 1 at the data's size)")
    p.add_argument("--latency-runs", type=int, default=20, help="onnxruntime runs for the median latency")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (0 = its default)")
    p.add_argument("--int8", action="store_true", help="also quantize both models to int8 (static QDQ, calibrated "
                                                       "on validation images) and add int8 rows to the report")
    add_patch_arguments(p)
    p.add_argument("--trust-code", action="store_true", help="let a --teacher run's config.yaml name code "
                                                             "(FILE.py:fn, pkg.mod:fn)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="training settings for both runs, e.g. lr=0.05 batch_size=64 seed=1")
    allow_intermixed(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``memplan pipeline``."""
    from memplan.pipeline import PipelineConfig, format_table, run_pipeline

    logging.basicConfig(format="%(message)s")
    for name in ("memplan.pipeline", "distill.trainer"):  # progress only; exporter chatter stays quiet
        logging.getLogger(name).setLevel(logging.INFO)
    config = PipelineConfig(
        model=args.model,
        data=args.data,
        out_dir=args.out,
        factor=args.factor,
        budget_bytes=parse_bytes(args.budget) if args.budget is not None else None,
        teacher=args.teacher,
        method=args.method,
        epochs=args.epochs,
        teacher_epochs=args.teacher_epochs,
        input_shape=parse_shape(args.input) if args.input else None,
        overrides=list(args.overrides),
        latency_runs=args.latency_runs,
        ort_threads=args.threads,
        trust_code=args.trust_code,
        int8=args.int8,
        patch=args.patch,
        stream_input=args.stream_input,
    )
    result = run_pipeline(config)
    print(format_table(result))
    print(f"\nwrote {result.report_md}, {result.report_json}, {result.student.onnx}, {result.teacher.onnx}")
    return 0
