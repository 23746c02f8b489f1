"""Analysis time and process peak RSS for every zoo model at 224 and 1024, plus synthetic chains.

Each measurement runs in a fresh child process, so its peak RSS (ru_maxrss) is its own: torch's
import, the model's parameters and the analysis. Models are built on the meta device when
``--meta`` is given (parameters cost nothing either); by default they are real, as a user's would be.
Targets (issue 2): ResNet-50 at 224 in <= 1 s; every 1024 run under 500 MB RSS; chains grow linearly.

    python benchmarks/analyze_speed.py            # prints the table, writes benchmarks/results/analyze_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "analyze_speed.json"
CHAIN_LENGTHS = (250, 500, 1000, 2000)


def _chain(layers: int):
    from torch import nn

    blocks = [nn.Conv2d(3, 8, 3, padding=1)]
    for _ in range(layers - 1):
        blocks.append(nn.Conv2d(8, 8, 3, padding=1))
    return nn.Sequential(*blocks)


def measure_one(kind: str, arg: str, size: int, meta: bool) -> dict:
    """Runs inside the child: build, analyze (warm-up on a tiny input first), report time and RSS."""
    import resource

    import torch

    from memplan import analyze
    from memplan.zoo import create_model, default_input

    with torch.device("meta" if meta else "cpu"):
        model = create_model(arg) if kind == "zoo" else _chain(int(arg))
    chans = default_input(arg)[1] if kind == "zoo" else 3
    analyze(model, (1, chans, 32, 32) if kind == "zoo" and size >= 32 else (1, chans, size, size))  # warm-up
    t0 = time.perf_counter()
    report = analyze(model, (1, chans, size, size))
    seconds = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "model": arg if kind == "zoo" else f"chain-{arg}",
        "input": size,
        "ops": len(report.timeline),
        "peak_bytes": report.peak_bytes,
        "seconds": round(seconds, 4),
        "peak_rss_mb": round(rss_mb, 1),
    }


def run_child(kind: str, arg: str, size: int, meta: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, arg, str(size)] + (["--meta"] if meta else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "ARG", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--meta", action="store_true", help="build models on the meta device")
    parser.add_argument("--sizes", default="224,1024")
    args = parser.parse_args()
    if args.child:
        kind, arg, size = args.child
        print(json.dumps(measure_one(kind, arg, int(size), args.meta)))
        return

    from memplan.io import write_json
    from memplan.report import fmt_bytes
    from memplan.zoo import list_models

    rows = []
    sizes = [int(s) for s in args.sizes.split(",")]
    for name in list_models():
        for size in sizes:
            rows.append(run_child("zoo", name, size, args.meta))
    for n in CHAIN_LENGTHS:
        rows.append(run_child("chain", str(n), 32, args.meta))
    print(f"{'model':<22} {'input':>5} {'ops':>5} {'peak':>12} {'seconds':>8} {'ms/op':>6} {'RSS MB':>7}")
    for r in rows:
        print(f"{r['model']:<22} {r['input']:>5} {r['ops']:>5} {fmt_bytes(r['peak_bytes']):>12} "
              f"{r['seconds']:>8.3f} {1000 * r['seconds'] / r['ops']:>6.2f} {r['peak_rss_mb']:>7.1f}")
    r50 = next(r for r in rows if r["model"] == "resnet50" and r["input"] == 224)
    big = [r for r in rows if r["input"] == 1024]
    chains = [r for r in rows if r["model"].startswith("chain")]
    print(f"\nresnet50@224: {r50['seconds']:.3f} s (target <= 1 s): {'ok' if r50['seconds'] <= 1 else 'MISSED'}")
    if big:
        worst = max(big, key=lambda r: r["peak_rss_mb"])
        print(f"max RSS at 1024: {worst['peak_rss_mb']:.0f} MB ({worst['model']}; target < 500 MB): "
              f"{'ok' if worst['peak_rss_mb'] < 500 else 'MISSED'}")
    print("chain ms/op: " + ", ".join(f"{r['ops']}: {1000 * r['seconds'] / r['ops']:.2f}" for r in chains))
    write_json({"machine": platform.processor() or platform.machine(), "meta_models": args.meta, "rows": rows},
               str(RESULTS))


if __name__ == "__main__":
    main()
