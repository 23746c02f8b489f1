"""Encoder-decoder student memory: teacher / k-factor student / student + RED blocks (6-site, 2-site).

For every zoo encoder-decoder (``unet_small``, and the DDPM UNets ``ddpm_unet_small`` / ``ddpm_unet``
where ``memplan.zoo.ddpm`` exists) at 32 and 64 px and k = 2 (and 4 for the UNets): deploy-form peaks
(docs/definitions.md §1) of the teacher, of the student the pass derives (passes.aggressive_pool), and
of the student with ReDistill's RED blocks at the stage map's ``6-site`` and ``2-site`` placements;
parameters; the recipe. Models are built on the meta device: only shapes matter. Rows are appended to
``benchmarks/results/student_memory_encdec.json`` as they finish and skipped when re-run.

Usage:
    python benchmarks/student_memory_encdec.py [--only NAME ...] [--fresh]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

from distill.red import attach_red
from memplan.analyze import analyze
from memplan.io import write_text_atomic
from memplan.zoo import create_model, list_models
from passes import PassError, aggressive_pool

RESULTS = Path(__file__).parent / "results" / "student_memory_encdec.json"
PAPER = "ReDistill DDPM (hand count, 32 px): 3.50 -> 0.88 MiB (4.0x)"


def cases() -> list[tuple[str, int, int]]:
    names = ["unet_small"]
    if importlib.util.find_spec("memplan.zoo.ddpm") is not None:
        names += [n for n in ("ddpm_unet_small", "ddpm_unet") if n in list_models()]
    return [(name, px, k) for name in names for px in (32, 64) for k in ((2, 4) if name == "unet_small" else (2,))]


def _inputs(name: str, px: int) -> list[torch.Tensor]:
    channels = 1 if name == "ddpm_unet_small" else 3
    x = torch.empty(1, channels, px, px, device="meta")
    return [x, torch.zeros(1, dtype=torch.long, device="meta")] if name.startswith("ddpm") else [x]


def measure(name: str, px: int, factor: int) -> dict:
    row: dict = {"model": name, "px": px, "factor": factor}
    inputs = _inputs(name, px)
    with torch.device("meta"):
        model = create_model(name).eval()
    start = time.perf_counter()
    try:
        student = aggressive_pool(model, inputs, factor=factor)
    except PassError as e:
        return {**row, "error": str(e)}
    row["derive_s"] = round(time.perf_counter() - start, 2)
    row["teacher"] = analyze(model, inputs).peak_bytes
    row["student"] = student.peak_bytes
    for placement in ("6-site", "2-site"):
        red = attach_red(student.module, student.stage_map, placement)
        row[f"red_{placement}"] = analyze(red, inputs).peak_bytes
        row[f"blocks_{placement}"] = len(red.red_points)
    row["teacher_params"] = sum(p.numel() for p in model.parameters())
    row["student_params"] = sum(p.numel() for p in student.module.parameters())
    row["changes"] = [c.describe() for c in student.recipe.changes]
    row["sites"] = len(student.stage_map.sites)
    return row


def mib(n: int) -> str:
    return f"{n / 2**20:.3f}"


def print_table(rows: list[dict]) -> None:
    head = (f"{'model':<16} {'px':>3} {'k':>2} {'teacher':>8} {'student':>8} {'ratio':>6} {'+RED 6':>8} {'ratio':>6} "
            f"{'+RED 2':>8} {'ratio':>6} {'params T':>9} {'params S':>9}")
    print("Deploy-form peak activation memory (MiB), fp32, batch 1; +RED 6 / 2 = RED blocks at the 6-site / 2-site placement")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<16} {r['px']:>3} {r['factor']:>2}  {r['error'][:90]}")
            continue
        t = r["teacher"]
        print(f"{r['model']:<16} {r['px']:>3} {r['factor']:>2} {mib(t):>8} {mib(r['student']):>8} "
              f"{t / r['student']:>5.2f}x {mib(r['red_6-site']):>8} {t / r['red_6-site']:>5.2f}x "
              f"{mib(r['red_2-site']):>8} {t / r['red_2-site']:>5.2f}x {r['teacher_params']:>9,} {r['student_params']:>9,}")
    print(f"\n{PAPER}")
    for r in rows:
        if "changes" in r and r["px"] == 32 and r["factor"] == 2:
            print(f"{r['model']} k=2: " + "; ".join(r["changes"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model names (default: every encoder-decoder of the zoo)")
    parser.add_argument("--fresh", action="store_true", help="re-measure rows already in the results file")
    args = parser.parse_args()
    done = [] if args.fresh or not RESULTS.exists() else json.loads(RESULTS.read_text())["rows"]
    key = {(r["model"], r["px"], r["factor"]) for r in done}
    rows = list(done)
    for name, px, factor in cases():
        if args.only and name not in args.only or (name, px, factor) in key:
            continue
        rows.append(measure(name, px, factor))
        write_text_atomic(RESULTS, json.dumps({"rows": rows, "paper": PAPER}, indent=2) + "\n")
    print_table(rows)


if __name__ == "__main__":
    main()
