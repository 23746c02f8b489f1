"""onnxruntime measured peak activation memory and latency: teacher vs k=4 aggressive-pool student.

ResNet18, ResNet50 and MobileNetV2 (memplan zoo, torchvision architectures, random weights) at
224x224 and 512x512, batch 1, fp32, CPU execution provider. Each model is exported with BN folded
(``memplan.export.export_onnx``, parity-checked) and measured by ``memplan.measure.measure_onnxruntime``
in a fresh child process: peak RSS growth of one run plus the input, with onnxruntime's arena and
memory patterns off ("no arena": every tensor its own allocation) and on (its default). The student
is ``passes.aggressive_pool(factor=4)``, shown without and with RED blocks (``distill.red.attach_red``,
input+output placement; docs/definitions.md §3: they stay in the deployed student). Target: measured peak cut
>= 2x (the ReDistill paper's v2 measured 2-3.2x on an edge GPU).

Usage:
    python benchmarks/onnx_memory.py [--only resnet18 ...] [--sizes 224 512] [--runs 10]
Prints a table and writes benchmarks/results/onnx_memory.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import onnxruntime
import torch

from distill.red import attach_red
from memplan.analyze import analyze
from memplan.export import export_onnx
from memplan.measure import measure_onnxruntime
from memplan.onnx_ort import analyze_ort_optimized
from memplan.report import fmt_bytes
from memplan.zoo import create_model
from passes.aggressive_pool import aggressive_pool

RESULTS = Path(__file__).parent / "results" / "onnx_memory.json"
MODELS = ("resnet18", "resnet50", "mobilenet_v2")
VARIANTS = ("teacher", "student", "student+red")


def build(name: str, variant: str, shape: tuple[int, ...]) -> torch.nn.Module:
    torch.manual_seed(0)  # the same random weights (and parity input) on every run
    model = create_model(name).eval()
    if variant == "teacher":
        return model
    s = aggressive_pool(model, torch.empty(shape), factor=4)
    return (attach_red(s.module, s.stage_map) if variant == "student+red" else s.module).eval()


def measure_one(name: str, variant: str, size: int, runs: int, tmp: Path) -> dict:
    shape = (1, 3, size, size)
    model = build(name, variant, shape)
    path = tmp / f"{name}-{variant}-{size}.onnx"
    # random-weight ResNet-50 logits reach ~1e2 at 512 px; fp32 summation order then differs by ~1e-4, so the
    # benchmark (which measures memory, not parity) allows 1e-3 and records the difference it saw
    export = export_onnx(model, torch.randn(shape), path, random_samples=1, tolerance=1e-3)
    row = {"model": name, "variant": variant, "size": size,
           "theory_deploy_bytes": analyze(model, shape).peak_bytes,
           "theory_ort_graph_bytes": analyze_ort_optimized(path).peak_bytes,
           "parity_max_abs_diff": export.max_abs_diff}
    for arena in (False, True):
        m = measure_onnxruntime(path, [shape], arena=arena, runs=runs)
        key = "arena" if arena else "no_arena"
        row[f"measured_{key}_bytes"], row[f"latency_{key}_ms"] = m.peak_bytes, round(m.latency_ms, 2)
    path.unlink()
    return row


def table(rows: list[dict]) -> str:
    teacher = {(r["model"], r["size"]): r for r in rows if r["variant"] == "teacher"}
    head = (f"| {'model':<12} | {'size':>4} | {'variant':<11} | {'theory':>10} | {'ORT graph':>10} | {'no arena':>10} "
            f"| {'arena':>10} | {'cut (no arena / arena)':>22} | {'latency':>9} |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        t = teacher[(r["model"], r["size"])]
        cut = "" if r["variant"] == "teacher" else (
            f"{t['measured_no_arena_bytes'] / r['measured_no_arena_bytes']:.2f}x / "
            f"{t['measured_arena_bytes'] / r['measured_arena_bytes']:.2f}x")
        lines.append(
            f"| {r['model']:<12} | {r['size']:>4} | {r['variant']:<11} | {fmt_bytes(r['theory_deploy_bytes']):>10} "
            f"| {fmt_bytes(r['theory_ort_graph_bytes']):>10} | {fmt_bytes(r['measured_no_arena_bytes']):>10} "
            f"| {fmt_bytes(r['measured_arena_bytes']):>10} | {cut:>22} | {r['latency_arena_ms']:>6.1f} ms |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=MODELS, default=list(MODELS))
    ap.add_argument("--sizes", nargs="*", type=int, default=[224, 512])
    ap.add_argument("--runs", type=int, default=10, help="runs for the median latency")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            for size in args.sizes:
                for variant in VARIANTS:
                    rows.append(measure_one(name, variant, size, args.runs, Path(tmp)))
                    print(f"  {name} {size} {variant}: no arena {fmt_bytes(rows[-1]['measured_no_arena_bytes'])}, "
                          f"arena {fmt_bytes(rows[-1]['measured_arena_bytes'])}", flush=True)
    print()
    print(table(rows))
    print("\ntheory = deploy-form lower bound of the PyTorch model (= the exported ONNX graph's); ORT graph = the "
          "same bound on the graph onnxruntime runs (level all: NCHWc layout); no arena / arena = measured peak RSS "
          "growth of one run + input; cut = teacher / student; latency = median, arena on, default threads.")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "environment": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                        "machine": platform.machine(), "processor": platform.processor(),
                        "cpus": len(__import__("os").sched_getaffinity(0))},
        "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
