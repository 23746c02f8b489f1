"""Student memory: teacher / aggressive-pool student / student + RED blocks, deploy-form peaks.

For every zoo CNN (ImageNet models at 1×3×224×224, small-image variants at 128×128) and k = 2, 4, 8
with the paper's absorb order (stem pools first), plus ``absorb="latest"`` where it differs (models
with a stem pool): the teacher peak, the student peak and ratio, and the peak with RED blocks
attached at the stage map (input+output and output-only placements). Then ``fit_budget`` for a
budget equal to the bare peak of the first student (in fit_budget's search order) whose RED blocks
raise its peak: that student fits without its RED blocks but not with them. Checks the paper's targets (ResNet18 ≥ 5.0×, ResNet50 ≥ 4.0× at k=4). Models are
built on the meta device: only shapes matter. Prints tables and writes
``benchmarks/results/student_memory.json``.

Usage:
    python benchmarks/student_memory.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from distill.red import REDBlock, attach_red
from memplan.analyze import analyze
from memplan.report import fmt_bytes
from memplan.zoo import create_model, default_input, list_models
from passes import (
    ABSORB,
    PLACEMENTS,
    AbsorbError,
    BudgetError,
    PassError,
    analyze_downsampling,
    build_student,
    fit_budget,
    plan_student,
)

RESULTS = Path(__file__).parent / "results" / "student_memory.json"
FACTORS = (2, 4, 8)
TARGETS = {"resnet18": 5.0, "resnet50": 4.0}  # ReDistill, k=4, ImageNet (docs/definitions.md §3)


def input_shape(name: str) -> tuple[int, ...]:
    shape = default_input(name)
    return (*shape[:2], 224, 224) if shape[-1] >= 224 else (*shape[:2], 128, 128)


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.3f}"


def measure(name: str) -> tuple[list[dict], dict | None]:
    """Rows of the student table for one model, and its fit_budget demonstration."""
    shape = input_shape(name)
    with torch.device("meta"):
        model = create_model(name, in_chans=shape[1]).eval()
    x = torch.empty(shape, device="meta")
    try:
        analysis = analyze_downsampling(model, x)
    except PassError as e:
        return [{"model": name, "input": list(shape), "error": str(e)}], None
    teacher = analysis.peak_bytes
    rows, seen = [], set()
    for factor in FACTORS:
        for absorb in ABSORB:
            row = {"model": name, "input": list(shape), "factor": factor, "absorb": absorb, "teacher": teacher}
            try:
                recipe = plan_student(analysis, factor, absorb=absorb)
            except AbsorbError:
                if absorb == ABSORB[0]:
                    rows.append({**row, "error": "cannot absorb"})
                continue
            if recipe.changes in seen:
                continue
            seen.add(recipe.changes)
            student = build_student(model, x, recipe, analysis)
            row.update(student=student.peak_bytes, strides=[s.student for s in student.strides],
                       red_blocks=len(student.stage_map.pairs))
            for placement in PLACEMENTS:
                red = attach_red(student.module, student.stage_map, placement)
                row[f"red_{placement}"] = analyze(red, x).peak_bytes
            rows.append(row)
    raised = next((r for r in rows if "student" in r and r["red_output"] > r["student"]), None)
    demo = None
    if raised is not None:  # that student fits its own bare peak, but not with its RED blocks
        budget = raised["student"]
        demo = {"model": name, "budget": budget, "raised": f"k={raised['factor']} {raised['absorb']}",
                "raised_peak": raised["red_output"]}
        try:
            fit = fit_budget(model, x, budget, REDBlock)
            demo.update(factor=fit.student.recipe.factor, absorb=fit.student.recipe.absorb,
                        placement=fit.placement, peak=fit.peak_bytes, tried=len(fit.candidates))
        except BudgetError as e:
            demo["error"] = str(e)
    return rows, demo


def print_tables(rows: list[dict], demos: list[dict]) -> None:
    head = (f"{'model':<20} {'input':>7} {'k':>2} {'absorb':<6} {'teacher':>8} {'student':>8} {'ratio':>6} "
            f"{'+RED io':>8} {'+RED out':>8} {'ratio':>6} {'RED x':>6}  strides")
    print("Deploy-form peak activation memory (MiB), fp32, batch 1; RED io = input+output placement")
    print(head)
    print("-" * len(head))
    for r in rows:
        size = f"{r['input'][-1]}px"
        if "error" in r:
            print(f"{r['model']:<20} {size:>7} {r.get('factor', ''):>2} {r.get('absorb', ''):<6} "
                  f"{mib(r.get('teacher')):>8}  {r['error'][:70]}")
            continue
        best_red = min(r["red_input+output"], r["red_output"])
        print(f"{r['model']:<20} {size:>7} {r['factor']:>2} {r['absorb']:<6} {mib(r['teacher']):>8} "
              f"{mib(r['student']):>8} {r['teacher'] / r['student']:>5.2f}x {mib(r['red_input+output']):>8} "
              f"{mib(r['red_output']):>8} {r['teacher'] / best_red:>5.2f}x "
              f"{r['red_input+output'] / r['student']:>5.2f}x  {r['strides']}")
    print()
    print("fit_budget (with RED) for budget = the bare peak of the first student whose RED blocks raise its peak")
    head = (f"{'model':<20} {'budget':>10} {'that student':<13} {'+RED':>10}  {'fit_budget choice':<36} "
            f"{'peak':>10} {'tried':>5}")
    print(head)
    print("-" * len(head))
    for d in demos:
        choice = (f"k={d['factor']} absorb={d['absorb']} RED {d['placement']}" if "error" not in d
                  else d["error"][:60])
        print(f"{d['model']:<20} {fmt_bytes(d['budget']):>10} {d['raised']:<13} {fmt_bytes(d['raised_peak']):>10}  "
              f"{choice:<36} {fmt_bytes(d['peak']) if 'peak' in d else '-':>10} {d.get('tried', '-'):>5}")


def check_targets(rows: list[dict]) -> list[str]:
    lines = []
    for name, target in TARGETS.items():
        row = next((r for r in rows if r["model"] == name and r.get("factor") == 4 and r.get("absorb") == "stem"
                    and "student" in r), None)
        if row is not None:
            ratio = row["teacher"] / row["student"]
            lines.append(f"{name} k=4: {row['teacher']:,} -> {row['student']:,} bytes = {ratio:.2f}x "
                         f"(target >= {target}x): {'PASS' if ratio >= target else 'FAIL'}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model names (default: every zoo model)")
    args = parser.parse_args()
    start = time.perf_counter()
    rows, demos = [], []
    for name in args.only or list_models():
        model_rows, demo = measure(name)
        rows += model_rows
        demos += [demo] if demo else []
    print_tables(rows, demos)
    targets = check_targets(rows)
    print()
    print("\n".join(targets))
    print(f"\n{time.perf_counter() - start:.0f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "fit_budget": demos, "targets": targets}, indent=2) + "\n")


if __name__ == "__main__":
    main()
