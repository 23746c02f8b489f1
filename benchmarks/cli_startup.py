"""Start-up time of the CLI against ``python -c "import torch"`` (the floor: memplan needs torch).

Each command runs ``--repeats`` times in a fresh process; the table shows the median wall time and
its ratio to the torch import. Heavy libraries (onnx, onnxruntime, onnxscript, matplotlib, the
trainer) are imported only by the commands that use them, so ``--help`` and ``analyze`` stay close
to the floor. Writes ``benchmarks/results/cli_startup.json``.

    python benchmarks/cli_startup.py --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from memplan.io import write_json

RESULTS = Path(__file__).resolve().parent / "results" / "cli_startup.json"
COMMANDS = {
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "memplan --help": [sys.executable, "-m", "memplan", "--help"],
    "memplan analyze zoo:resnet_tiny": [sys.executable, "-m", "memplan", "analyze", "zoo:resnet_tiny"],
    "memplan analyze zoo:resnet50": [sys.executable, "-m", "memplan", "analyze", "zoo:resnet50"],
    "memplan train --help": [sys.executable, "-m", "memplan", "train", "--help"],
}


def _time(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    _time(COMMANDS["python -c 'import torch'"])  # warm the page cache
    rows = []
    for label, argv in COMMANDS.items():
        times = [_time(argv) for _ in range(args.repeats)]
        rows.append({"command": label, "median_s": statistics.median(times), "min_s": min(times),
                     "max_s": max(times)})
    floor = rows[0]["median_s"]
    print(f"{'command':<36} {'median s':>9} {'min s':>7} {'max s':>7} {'x torch':>8}")
    for r in rows:
        r["ratio_to_torch_import"] = r["median_s"] / floor
        print(f"{r['command']:<36} {r['median_s']:>9.3f} {r['min_s']:>7.3f} {r['max_s']:>7.3f} "
              f"{r['ratio_to_torch_import']:>8.2f}")
    write_json({"repeats": args.repeats, "python": sys.version.split()[0], "rows": rows}, RESULTS)


if __name__ == "__main__":
    main()
