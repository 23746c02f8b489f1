"""int8 vs fp32 accuracy of trained students: the distillation benchmark's run directories, exported
to ONNX (BN folded), quantized statically (QDQ, per-channel, onnxruntime's tools) on 256 images of
the data's validation split, and both files scored in onnxruntime on the whole test split.

The target (issue: int8): the int8 student within 0.5 point of its fp32 twin. Rows go to
``benchmarks/results/int8_accuracy.json`` as they finish and are skipped on re-run.

Usage:
    python benchmarks/int8_accuracy.py runs/distill_fashion_mnist/canvas/red-blocks+kd@placement=input+output/seed*
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from distill.data import load_data
from distill.run import RunDir
from memplan.export import export_onnx
from memplan.io import write_json
from memplan.pipeline import INT8_CALIBRATION, ort_accuracy
from memplan.quantize import quantize_onnx

RESULTS = Path(__file__).parent / "results" / "int8_accuracy.json"
TARGET_POINTS = 0.5


def score(run_path: Path) -> dict:
    """fp32 and int8 test accuracy (%) of the student in ``run_path``."""
    run = RunDir(run_path)
    config = run.config()
    model, shape = run.load_model().eval(), tuple(run.input_shape())
    bundle = load_data(config.data)
    calib = bundle.preprocess(bundle.val.images[:INT8_CALIBRATION], train=False)
    test = bundle.preprocess(bundle.test.images, train=False)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_onnx(model, test[: shape[0]], fp32, real_inputs=test[:64])
        q = quantize_onnx(fp32, int8, calib.numpy(), test[:INT8_CALIBRATION].numpy())
        acc32, acc8 = ort_accuracy(fp32, test, bundle.test.labels), ort_accuracy(int8, test, bundle.test.labels)
    return {"run": str(run_path), "data": config.data, "method": config.method, "test_images": len(test),
            "fp32_accuracy": round(acc32, 2), "int8_accuracy": round(acc8, 2), "drop_points": round(acc32 - acc8, 2),
            "top1_agreement": q.top1_agreement, "max_abs_diff": q.max_abs_diff,
            "target_met": acc32 - acc8 <= TARGET_POINTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of trained students")
    args = parser.parse_args()
    torch.set_num_threads(1)
    doc = json.loads(RESULTS.read_text()) if RESULTS.exists() else {
        "benchmark": "int8_accuracy", "machine": platform.machine(), "device": "cpu", "rows": []}
    done = {r["run"] for r in doc["rows"]}
    for path in args.runs:
        if str(path) in done:
            continue
        doc["rows"].append(score(path))
        write_json(doc, RESULTS)
        r = doc["rows"][-1]
        print(f"{r['run']}: fp32 {r['fp32_accuracy']:.2f}%  int8 {r['int8_accuracy']:.2f}%  "
              f"drop {r['drop_points']:+.2f} points  agreement {r['top1_agreement']:.4f}", flush=True)
    rows = doc["rows"]
    if rows:
        mean = sum(r["drop_points"] for r in rows) / len(rows)
        print(f"mean drop over {len(rows)} runs: {mean:+.2f} points (target <= {TARGET_POINTS})")


if __name__ == "__main__":
    main()
