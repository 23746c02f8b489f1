"""Export cost: memplan's export (export, BN folding on the ONNX graph, full onnx.checker, onnxruntime
session and parity on 2 random inputs) against a plain ``torch.onnx.export(dynamo=True)`` + save.

Zoo models (torchvision architectures, random weights) at 224x224, batch 1, or any model spec
(``timm:NAME``, ``torchvision:NAME``: run in a venv that has them) at its default input. Each model is timed
``--repeat`` times per method, interleaved, after one warm-up export of a tiny net (the exporter's
one-time registry setup is not per-model cost); the minimum is kept (the machine is shared).
PyTorch runs ``--threads`` threads (default 1: on an oversubscribed machine OpenMP's spinning
threads make a ResNet-50 forward 5-40x slower at 2 threads, which would time the machine, not the
export); both methods run under the same setting.
Target (issue 15): ratio = memplan / plain <= 1.5x.

Usage:
    python benchmarks/export_speed.py [--only resnet50 timm:tf_efficientnet_b0 ...] [--repeat 2] [--force]
Prints a table and writes benchmarks/results/export_speed.json (rows as they finish; rows already
there are skipped unless --force).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime
import torch

from memplan.export import export_onnx
from memplan.specs import default_input, load_model

RESULTS = Path(__file__).parent / "results" / "export_speed.json"
MODELS = ("resnet50", "resnet18", "mobilenet_v2")
TARGET = 1.5


def plain_export(model: torch.nn.Module, x: torch.Tensor, path: Path) -> None:
    """What a user would run: the dynamo exporter, saved to one file."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), dynamo=True).save(str(path), external_data=False)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure(name: str, repeat: int, tmp: Path) -> dict:
    spec = name if ":" in name else f"zoo:{name}"
    torch.manual_seed(0)
    model = load_model(spec).eval()
    x = torch.randn(default_input(spec))
    plain, ours, result = [], [], None
    for _ in range(repeat):
        plain.append(timed(plain_export, model, x, tmp / "plain.onnx"))
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = export_onnx(model, x, tmp / "memplan.onnx")
        ours.append(time.perf_counter() - start)
    return {"model": name, "size": x.shape[-1], "torch": torch.__version__, "plain_s": round(min(plain), 2), "memplan_s": round(min(ours), 2),
            "ratio": round(min(ours) / min(plain), 3), "bn_folded": len(result.folded),
            "max_abs_diff": result.max_abs_diff, "max_rel_diff": result.max_rel_diff,
            "all_plain_s": [round(t, 2) for t in plain], "all_memplan_s": [round(t, 2) for t in ours]}


def table(rows: list[dict]) -> str:
    head = (f"| {'model':<34} | {'plain export':>12} | {'memplan export':>14} | {'ratio':>6} | {'target':>7} "
            f"| {'BN folded':>9} | {'max abs diff':>12} | {'relative':>9} |")
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        ok = "ok" if r["ratio"] <= TARGET else "MISSED"
        lines.append(f"| {r['model']:<34} | {r['plain_s']:>10.2f} s | {r['memplan_s']:>12.2f} s | {r['ratio']:>5.2f}x "
                     f"| {ok:>7} | {r['bn_folded']:>9} | {r['max_abs_diff']:>12.2e} | {r['max_rel_diff']:>9.2e} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=list(MODELS), help="zoo names or model specs (timm:NAME ...)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="re-measure rows already in the results file")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    rows = {r["model"]: r for r in saved.get("rows", [])}
    env = {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "machine": platform.machine(),
           "cpus": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        plain_export(torch.nn.Conv2d(3, 4, 3), torch.zeros(1, 3, 8, 8), Path(tmp) / "warm.onnx")  # warm-up
        for name in args.only:
            if name in rows and not args.force:
                print(f"  {name}: already measured (use --force)", flush=True)
                continue
            rows[name] = measure(name, args.repeat, Path(tmp))
            print(f"  {name}: plain {rows[name]['plain_s']:.2f} s, memplan {rows[name]['memplan_s']:.2f} s "
                  f"({rows[name]['ratio']:.2f}x)", flush=True)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps({"environment": env, "rows": list(rows.values())}, indent=2) + "\n")
    print()
    print(table(list(rows.values())))
    print(f"\nplain = torch.onnx.export(dynamo=True) + save; memplan = memplan.export.export_onnx (export, ONNX-graph "
          f"BN folding, full checker, onnxruntime session, parity on 2 random inputs); min of --repeat runs; "
          f"target ratio <= {TARGET}x.")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
