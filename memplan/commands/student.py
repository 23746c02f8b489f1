"""``memplan student MODEL``: derive an aggressive-pooling student (docs/definitions.md §4) and report its memory.

Prints teacher vs student deploy-form peak and ratio, the changed strides, the stage map and the
peak with the RED blocks distillation attaches (docs/definitions.md §5); ``--out DIR`` writes a student run
directory (:class:`distill.run.RunDir`: ``recipe.json``, ``config.yaml``, ``run.json``, ``student.pt``) that
``memplan export DIR`` and ``memplan distill --recipe DIR/recipe.json`` accept; ``--recipe`` re-applies a
saved recipe.

Example:
    $ memplan student zoo:resnet18 --factor 4 --out runs/r18-k4
    $ memplan student zoo:resnet50 --budget 2.5MiB --json -
    $ memplan student --recipe runs/r18-k4/recipe.json zoo:resnet18
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from distill.config import TrainConfig
from distill.red import REDBlock, attach_red
from distill.run import RunDir
from memplan.analyze import analyze
from memplan.cli import command
from memplan.io import write_json
from memplan.report import fmt_bytes, parse_bytes
from memplan.specs import default_input, load_model, parse_shape
from passes import (
    ABSORB,
    ENCDEC_PLACEMENTS,
    PLACEMENTS,
    POOLS,
    Recipe,
    Student,
    aggressive_pool,
    apply_recipe,
    fit_budget,
)


def add_patch_arguments(p: argparse.ArgumentParser) -> None:
    """``--patch`` and ``--stream-input``, shared with ``memplan pipeline``."""
    p.add_argument("--patch", action="store_true", help="also run the student's early stage (RED blocks included) "
                                                        "patch by patch (passes.patch) and report that peak")
    p.add_argument("--stream-input", action="store_true", help="with --patch: the input arrives per patch (a "
                                                               "camera delivering rows), not resident")


@command("student", "derive an aggressive-pooling student: teacher vs student peak, strides, stage map, RED")
def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``memplan student``."""
    p.add_argument("model", help="zoo:NAME, torchvision:NAME, timm:NAME, FILE.py:CALLABLE or pkg.module:CALLABLE")
    p.add_argument("--input", help="input shape, e.g. 1,3,224,224 (default: the model's, or the recipe's)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--factor", type=int, help="k: the stem downsamples k times more (2, 4 or 8)")
    how.add_argument("--budget", help="pick the least aggressive student whose deployed peak (with RED blocks) "
                                      "fits, e.g. 512KiB, 1.5MiB, 800000")
    how.add_argument("--recipe", metavar="PATH", help="re-apply a recipe.json written by --out")
    p.add_argument("--pool", choices=POOLS, default="stride",
                   help="stride: larger stem stride; max/avg: insert a pool after the stem")
    p.add_argument("--absorb", choices=ABSORB, default="stem",
                   help="where k is taken out again: stem pools first (paper), or latest levels first")
    p.add_argument("--placement", choices=(*PLACEMENTS, *ENCDEC_PLACEMENTS), default="input+output",
                   help="RED blocks counted in the peak (--budget chooses it itself); encoder-decoders also take "
                        "ReDistill's 6-site / 2-site placements (input+output = 6-site)")
    p.add_argument("--no-red", action="store_true", help="with --budget: do not count RED blocks")
    add_patch_arguments(p)
    p.add_argument("--out", metavar="DIR", help="write a student run directory (config.yaml, recipe.json, run.json, "
                                                "student.pt) that export and distill accept")
    p.add_argument("--json", metavar="PATH", help="write the summary as JSON ('-' = stdout)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``memplan student``."""
    model = load_model(args.model)
    recipe = Recipe.load(args.recipe) if args.recipe else None
    shape = parse_shape(args.input) if args.input else recipe.input_shape if recipe else default_input(args.model)
    x = torch.empty(shape, device="meta")
    placement, budget = args.placement, None
    if args.budget is not None:
        budget = parse_bytes(args.budget)
        fit = fit_budget(model, x, budget, None if args.no_red else REDBlock, pool=args.pool)
        student, placement = fit.student, fit.placement or placement
    elif recipe is not None:
        student = apply_recipe(model, recipe, x)
    else:
        student = aggressive_pool(model, x, args.factor, args.pool, args.absorb)
    red = attach_red(student.module, student.stage_map, placement)
    doc = {
        "model": args.model,
        "input_shape": list(shape),
        "teacher_peak_bytes": analyze(model, x).peak_bytes,
        "student_peak_bytes": student.peak_bytes,
        "student_with_red_peak_bytes": analyze(red, x).peak_bytes,
        "factor": student.recipe.factor,
        "pool": student.recipe.pool,
        "absorb": student.recipe.absorb,
        "red_placement": placement,
        "red_blocks": len(red.red_points),
        "budget_bytes": budget,
        "strides": [{"level": s.label, "teacher": s.teacher, "student": s.student} for s in student.strides],
        "changes": [c.to_json() for c in student.recipe.changes],
        "stage_map": student.stage_map.to_json(),
        "weights": student.transfer.summary(),
    }
    if args.patch or args.stream_input:
        from passes.patch import patch_model

        patched = patch_model(red, shape, stream_input=args.stream_input)
        doc["patch"] = patched.to_json()
        doc["patched_peak_bytes"] = patched.patched_peak_bytes
    written = _write(student, args.model, shape, args.out) if args.out else []
    if args.json != "-":
        print(_format(doc, student, written))
    if args.json:
        write_json(doc, args.json)
    return 0


def _write(student: Student, spec: str, shape: tuple[int, ...], out: str) -> list[str]:
    """A ``student`` run directory (:class:`distill.run.RunDir`): what export, distill and analyze accept."""
    run = RunDir(out)
    with run.lock():
        run.write_config(TrainConfig(teacher=spec, factor=student.recipe.factor, pool=student.recipe.pool,
                                     absorb=student.recipe.absorb).to_dict())
        run.write_recipe(student.recipe, None)
        run.write_info("student", shape)
        run.save("student.pt", student.module.state_dict())
    return [str(run / name) for name in (RunDir.CONFIG, RunDir.RECIPE, RunDir.INFO, "student.pt")]


def _peak(n: int, teacher: int) -> str:
    return f"{fmt_bytes(n):>12} ({n:,} bytes)  {teacher / n:.2f}x lower than the teacher"


def _format(doc: dict[str, Any], student: Student, written: list[str]) -> str:
    teacher = doc["teacher_peak_bytes"]
    lines = [
        f"model            {doc['model']}  input {'x'.join(map(str, doc['input_shape']))}  deploy form",
        f"teacher peak     {fmt_bytes(teacher):>12} ({teacher:,} bytes)",
        f"student peak     {_peak(doc['student_peak_bytes'], teacher)}",
        f"  + RED blocks   {_peak(doc['student_with_red_peak_bytes'], teacher)}  "
        f"[{doc['red_blocks']} blocks, {doc['red_placement']}]",
        f"recipe           factor {doc['factor']}, pool {doc['pool']}, absorb {doc['absorb']}",
    ]
    if "patch" in doc:
        q = doc["patch"]
        lines.append(f"  + patched      {_peak(q['patched_peak_bytes'], teacher)}  [split {q['split_node']}, grid "
                     f"{'x'.join(map(str, q['patches']))}, {q['halo']} halos, MACs x{q['mac_overhead']:.3f}, "
                     f"input {'streamed' if q['stream_input'] else 'resident'}]")
    if doc["budget_bytes"] is not None:
        lines.append(f"budget           {fmt_bytes(doc['budget_bytes'])} ({doc['budget_bytes']:,} bytes): least "
                     "aggressive fitting student")
    lines += ["", "downsampling levels (stride teacher -> student):"]
    lines += [f"  {s.label:<28} {s.teacher} -> {s.student}{'' if s.teacher == s.student else '  *'}"
              for s in student.strides]
    lines += ["", "changes:"] + [f"  {c.describe()}" for c in student.recipe.changes]
    if not student.recipe.changes:
        lines.append("  none")
    lines += ["", "stage map (RED block on student point  <-  teacher point of equal size):"]
    for p in student.stage_map.pairs:
        size = "x".join(map(str, p.size))
        lines.append(f"  stage {p.stage:<2} {p.position:<7} {p.student:<24} {p.channels:>5}x{size:<9} <- "
                     f"{p.teacher:<24} {p.teacher_channels:>5}x{size}")
    if not student.stage_map.pairs:
        lines.append("  none (no feature map shrank)")
    if student.stage_map.unmatched:
        lines.append(f"  no teacher map of equal size for: {', '.join(student.stage_map.unmatched)}")
    lines += ["", f"weights          {doc['weights']}"]
    if written:
        lines.append(f"wrote            {', '.join(written)}")
    return "\n".join(lines)
