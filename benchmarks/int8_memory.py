"""int8 activation memory: fp32 vs static QDQ int8 of the same export, in memplan's analysis and in
onnxruntime (issue 12's "int8 activations ~4x below fp32 in memplan's analysis and in onnxruntime
measured").

Zoo models at 224x224 (random weights), exported by ``memplan.export.export_onnx`` and quantized by
``memplan.quantize.quantize_onnx`` (QDQ, per-channel weights). Calibration uses 8 seeded random
images: only memory is compared here, so the calibration's accuracy does not matter (accuracy is
``benchmarks/int8_accuracy.py``). Per file: the deploy-form peak (``memplan analyze FILE.onnx``),
the ``--runtime ort`` prediction and onnxruntime's measured peak by the clean method (arena off, 1
thread, median of 3, input included). The target is that int8 is about 4x below fp32 in each.

onnxruntime's int8 conv kernel keeps scratch that fp32 NCHWc convs do not (``--runtime ort`` models
it: an int32 accumulator of the whole output and an im2col copy where MLAS's symmetric kernel does
not take the conv, e.g. a 3-channel stem), so the measured int8 ratio is far below 4x on an
unpatched model. Each model is therefore also patched (``passes.patch``, resident input, MAC
overhead <= 20 %) before quantization: every patch's scratch is a patch's worth, and the
``patched_int8`` columns compare that file with the plain fp32 one. The plan is the one
``memplan patch --runtime ort`` picks (``patch_for_runtime``: of the best plan of each halo mode, the
one whose patched fp32 export onnxruntime is predicted to run smallest). ``patched_int8_u8`` is the same file taking the
uint8 image (``quantize_onnx(integer_input=True)``, ``memplan export --int8-input``): the resident
input at 1 byte per pixel instead of 4, as an int8 deployment feeds it. Each file is also predicted
and measured with ``SessionOptions.enable_mem_reuse = False`` (``--runtime ort-noreuse``), where
onnxruntime's planner no longer keeps one buffer per tensor shape through the whole patch loop.

Usage:
    python benchmarks/int8_memory.py [--only resnet18 ...] [--force]
Writes benchmarks/results/int8_memory.json (rows as they finish; rows already there are skipped
unless --force) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from memplan.commands.patch import export_patched, patch_for_runtime
from memplan.export import export_onnx
from memplan.io import write_json
from memplan.measure import measure_onnxruntime
from memplan.onnx_ort import analyze_onnx_file
from memplan.ort_runtime import predict_ort
from memplan.quantize import quantize_onnx
from memplan.zoo import create_model

RESULTS = Path(__file__).parent / "results" / "int8_memory.json"
MODELS = ("resnet18", "mobilenet_v2")
SHAPE = (1, 3, 224, 224)
SESSIONS = 3  # measured sessions of a file whose order varies; the highest session's median is reported
KINDS = ("deploy", "predicted_ort", "measured", "predicted_noreuse", "measured_noreuse", "measured_noreuse_4k")


LABELS = ("fp32", "int8", "patched_int8", "patched_int8_u8")


def measure(name: str, tmp: Path) -> dict:
    torch.manual_seed(0)
    model = create_model(name).eval()
    fp32, int8 = tmp / f"{name}.onnx", tmp / f"{name}_int8.onnx"
    export_onnx(model, torch.randn(SHAPE), fp32)
    calibration = np.random.default_rng(0).standard_normal((8, *SHAPE[1:])).astype(np.float32)
    quantize_onnx(fp32, int8, calibration, calibration[:4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result, picks = patch_for_runtime(model, SHAPE, "ort", verify=1)
        patched = tmp / f"{name}_patched.onnx"
        export_patched(model, result.plan, patched, tolerance=1e-3)
    plan = result.plan
    chosen = {"patch_split": plan.split_node, "patch_grid": list(plan.grid), "patch_halo": plan.halo,
              "patch_pace": plan.pace, "patch_plans_predicted_fp32_bytes":
              {f"{c['halo']}/{c['pace']}": c["predicted_bytes"] for c in picks}}
    patched_int8, patched_u8 = tmp / f"{name}_patched_int8.onnx", tmp / f"{name}_patched_int8_u8.onnx"
    quantize_onnx(patched, patched_int8, calibration, calibration[:4])
    quantize_onnx(patched, patched_u8, calibration, calibration[:4], integer_input=True)
    row: dict = {"model": name, "size": SHAPE[-1], **chosen}
    for label, path in zip(LABELS, (fp32, int8, patched_int8, patched_u8)):
        row[f"{label}_deploy_bytes"] = analyze_onnx_file(path).peak_bytes
        plan = predict_ort(path)
        row[f"{label}_predicted_ort_bytes"] = plan.peak_bytes
        # onnxruntime may order a patched graph's patches differently in each session: where the
        # prediction saw more than one order, the highest of SESSIONS measured sessions is reported
        kw = {"repeats": 3, "runs": 1, "sessions": SESSIONS if plan.orders_seen > 1 else 1}
        row[f"{label}_orders_seen"] = plan.orders_seen
        row[f"{label}_measured_bytes"] = measure_onnxruntime(path, [SHAPE], **kw).peak_bytes
        row[f"{label}_predicted_noreuse_bytes"] = predict_ort(path, runtime="ort-noreuse").peak_bytes
        row[f"{label}_measured_noreuse_bytes"] = measure_onnxruntime(path, [SHAPE], mem_reuse=False, **kw).peak_bytes
        row[f"{label}_measured_noreuse_4k_bytes"] = measure_onnxruntime(
            path, [SHAPE], mem_reuse=False, mmap_threshold=4096, **kw).peak_bytes
    for kind in KINDS:
        for label in LABELS[1:]:
            row[f"{label}_{kind}_ratio"] = round(row[f"fp32_{kind}_bytes"] / row[f"{label}_{kind}_bytes"], 3)
    for label in LABELS:
        row[f"{label}_ort_error_pct"] = round(100 * (row[f"{label}_predicted_ort_bytes"] /
                                                     row[f"{label}_measured_bytes"] - 1), 1)
        row[f"{label}_noreuse_error_pct"] = round(100 * (row[f"{label}_predicted_noreuse_bytes"] /
                                                         row[f"{label}_measured_noreuse_4k_bytes"] - 1), 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=MODELS, default=list(MODELS))
    ap.add_argument("--force", action="store_true", help="re-measure rows already in the results file")
    args = ap.parse_args()
    doc = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": []}
    doc["environment"] = {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                          "machine": platform.machine(), "device": "cpu"}
    rows = {r["model"]: r for r in doc["rows"]}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            if name in rows and not args.force:
                continue
            rows[name] = measure(name, Path(tmp))
            doc["rows"] = list(rows.values())
            write_json(doc, str(RESULTS))
    print(f"{'model':<14} {'form':<22} {'fp32':>12} {'int8':>12} {'ratio':>7} {'patched int8':>13} {'ratio':>7} "
          f"{'+ uint8 input':>13} {'ratio':>7}")
    for r in rows.values():
        for kind in KINDS:
            print(f"{r['model']:<14} {kind:<22} {r[f'fp32_{kind}_bytes']:>12,} {r[f'int8_{kind}_bytes']:>12,} "
                  f"{r[f'int8_{kind}_ratio']:>6.2f}x {r[f'patched_int8_{kind}_bytes']:>13,} "
                  f"{r[f'patched_int8_{kind}_ratio']:>6.2f}x {r[f'patched_int8_u8_{kind}_bytes']:>13,} "
                  f"{r[f'patched_int8_u8_{kind}_ratio']:>6.2f}x")
        for err in ("ort", "noreuse"):
            print(f"{'':<14} {err + ' error':<22} {r[f'fp32_{err}_error_pct']:>+11.1f}% "
                  f"{r[f'int8_{err}_error_pct']:>+11.1f}% {'':>7} {r[f'patched_int8_{err}_error_pct']:>+12.1f}% "
                  f"{'':>7} {r[f'patched_int8_u8_{err}_error_pct']:>+12.1f}%")
        print(f"{'':<14} (patched at {r['patch_split']}, grid {r['patch_grid']}, halo {r['patch_halo']}, pace "
              f"{r['patch_pace']}; onnxruntime-predicted fp32 peak of each plan tried: "
              f"{r['patch_plans_predicted_fp32_bytes']})")
    print("\ntarget: int8 about 4x below fp32 in each form. measured = onnxruntime, arena off, 1 thread, median of "
          "3 (the highest of 3 sessions where onnxruntime's order varies), input included, MALLOC_MMAP_THRESHOLD_=65536 (4k: 4096); predicted: the "
          "worst execution order over the sessions sampled; noreuse = SessionOptions.enable_mem_reuse "
          "= False; ratios against the unpatched fp32 file in the same setting; noreuse error against the 4k "
          "measurement (at 65536 glibc's heap fragmentation over many small blocks adds pages)")


if __name__ == "__main__":
    main()
