"""``memplan analyze MODEL``: peak activation memory, where it happens and what is live there."""

from __future__ import annotations

import argparse

from memplan.analyze import analyze
from memplan.cli import command
from memplan.graph import DTYPES, FORMS
from memplan.loader import default_input, load_model, parse_shape
from memplan.report import format_table, write_json


@command("analyze", "peak activation memory of a model: where, what is live, per stage")
def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``memplan analyze``."""
    p.add_argument("model", help="zoo:NAME, torchvision:NAME, timm:NAME, FILE.py:CALLABLE or pkg.module:CALLABLE")
    p.add_argument("--input", default=None, help="input shape, e.g. 1,3,224,224")
    p.add_argument("--form", choices=FORMS, default="deploy")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--inplace-elementwise", action="store_true",
                   help="also let add/mul/sub/div overwrite a same-size input nobody else reads")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON ('-' = stdout)")
    p.add_argument("--plot", metavar="PATH.png", help="draw the live-memory timeline")
    p.add_argument("--top", type=int, default=10, help="rows of the live-at-peak table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``memplan analyze``."""
    model = load_model(args.model)
    shape = parse_shape(args.input) if args.input else default_input(args.model)
    report = analyze(model, shape, form=args.form, dtype=args.dtype,
                     inplace_elementwise=args.inplace_elementwise, name=args.model)
    if args.json != "-":
        print(format_table(report, top=args.top))
    if args.json:
        write_json(report.to_json(), args.json)
    if args.plot:
        from memplan.plot import plot_timeline

        plot_timeline(report, args.plot)
    return 0
