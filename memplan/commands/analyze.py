"""``memplan analyze MODEL``: peak activation memory, where it happens and what is live there."""

from __future__ import annotations

import argparse

from memplan.analyze import analyze, report_from_graph
from memplan.cli import command
from memplan.graph import DTYPES, FORMS
from memplan.io import write_json
from memplan.ort_runtime import RUNTIMES
from memplan.planner import plan_arena
from memplan.report import fmt_bytes, format_table
from memplan.schedule import best_order
from memplan.specs import example_inputs, load_model, parse_shape


@command("analyze", "peak activation memory of a model: where, what is live, per stage")
def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``memplan analyze``."""
    p.add_argument("model", help="zoo:NAME, torchvision:NAME, timm:NAME, FILE.py:CALLABLE, pkg.module:CALLABLE or FILE.onnx")
    p.add_argument("--input", action="append", default=None, metavar="SHAPE[:DTYPE]",
                   help="input shape, e.g. 1,3,224,224; repeat it for each further forward argument "
                        "(a denoiser's time step: --input 1,1,32,32 --input 1:int64)")
    p.add_argument("--form", choices=FORMS, default="deploy",
                   help="the graph's own peak: 'deploy' (default) is an idealised edge runtime (BN folded, "
                        "activations in place) for comparing architectures; 'as-written' runs every op as "
                        "captured. For what a real runtime uses, see --runtime")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--inplace-elementwise", action="store_true",
                   help="also let add/mul/sub/div overwrite a same-size input nobody else reads")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON ('-' = stdout)")
    p.add_argument("--order", choices=("program", "best"), default="program",
                   help="op order: as traced, or searched for the lowest peak (exact DP when small enough)")
    p.add_argument("--align", type=int, default=64, metavar="BYTES", help="arena offset alignment")
    p.add_argument("--plot", metavar="PATH.png", help="draw the live-memory timeline")
    p.add_argument("--plot-arena", metavar="PATH.png", help="draw the arena plan (offset vs step)")
    p.add_argument("--top", type=int, default=10, help="rows of the live-at-peak table")
    p.add_argument("--ort-optimized", action="store_true",
                   help="for FILE.onnx: analyse the graph onnxruntime runs after its fusions")
    p.add_argument("--runtime", choices=RUNTIMES, default=None,
                   help="predict the peak one onnxruntime CPU inference really uses, input included (a PyTorch "
                        "model is exported first): its optimized graph, execution order, in-place kernels, their "
                        "scratch and allocation planner; 'ort' with the arena off (what 'memplan measure' "
                        "measures cleanly), 'ort-arena' through its BFC arena (its default allocator), "
                        "'ort-noreuse' arena off with SessionOptions.enable_mem_reuse = False (the setting that "
                        "keeps a patched model small). Use it to ask 'will it fit with onnxruntime'")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``memplan analyze``."""
    from memplan.errors import MemplanError

    texts = args.input or []
    if (args.runtime or args.model.endswith(".onnx")) and len(texts) > 1:
        raise MemplanError("--runtime and FILE.onnx take one --input (the image); "
                           f"got {len(texts)}")
    image = texts[0] if texts else None
    if args.runtime:
        from memplan.ort_runtime import analyze_runtime

        if args.order != "program" or args.ort_optimized or args.form != "deploy" or args.dtype != "float32" \
                or args.inplace_elementwise:
            raise MemplanError("--runtime predicts onnxruntime's own plan (its order, float32 as exported): "
                               "it does not combine with --order/--form/--dtype/--inplace-elementwise/--ort-optimized")
        report = analyze_runtime(args.model, parse_shape(image) if image else None, runtime=args.runtime)
    elif args.model.endswith(".onnx"):
        from memplan.onnx_ort import analyze_onnx_file

        report = analyze_onnx_file(args.model, ort_optimized=args.ort_optimized, input_shape=image,
                                   form=args.form, dtype=args.dtype, inplace_elementwise=args.inplace_elementwise)
    else:
        model = load_model(args.model)
        report = analyze(model, example_inputs(args.model, texts), form=args.form, dtype=args.dtype,
                         inplace_elementwise=args.inplace_elementwise, name=args.model)
    notes = []
    if args.runtime:
        setting = {"ort": "arena off", "ort-arena": "BFC arena", "ort-noreuse": "arena off, no memory reuse"}
        notes.append(f"runtime          onnxruntime CPU, {setting[args.runtime]}, 1 thread: {report.extra['placements']}")
        if "orders_seen" in report.extra:
            low, high = report.extra["peak_range_bytes"]
            notes.append(f"execution order  onnxruntime ran this graph in {report.extra['orders_seen']} different orders "
                         f"over the sessions sampled: peak {fmt_bytes(low)} to {fmt_bytes(high)}; the highest is "
                         "reported")
    elif args.order == "best":
        schedule = best_order(report.graph)
        report = report_from_graph(report.graph, order=schedule.order, param_bytes=report.param_bytes,
                                   model=report.model, param_side_bytes=report.param_side_bytes)
        report.extra.update(order_method=schedule.method, order_seconds=round(schedule.seconds, 3),
                            program_order_peak_bytes=schedule.program_order_peak_bytes)
        proof = "proven optimal" if schedule.method == "dp" else "best found"
        notes.append(f"order            best: {schedule.saving:.1%} below program order ({proof}, found by "
                     f"{schedule.source}, {schedule.seconds:.2f} s)")
    else:
        report.extra["order_method"] = "onnxruntime" if args.runtime else "program"
    plan = plan_arena(report.lifetimes, alignment=args.align)
    report.extra.update(order=report.order, arena_bytes=plan.arena_bytes, lower_bound_bytes=plan.lower_bound_bytes,
                        arena_ratio=round(plan.ratio, 6), arena_strategy=plan.strategy, alignment=plan.alignment)
    notes.append(f"arena / LB       {plan.ratio:.4f}  (LB {fmt_bytes(plan.lower_bound_bytes)} with sizes aligned "
                 f"to {plan.alignment} B; {plan.strategy})")
    if args.json != "-":
        print(format_table(report, top=args.top))
        print("\n".join(notes))
    if args.json:
        write_json(report.to_json(), args.json)
    if args.plot:
        from memplan.plot import plot_timeline

        plot_timeline(report, args.plot)
    if args.plot_arena:
        from memplan.plot import plot_arena

        plot_arena(report, plan, args.plot_arena)
    return 0
