"""Does distillation recover what an aggressive-pooling student loses? ReDistill vs baselines on Fashion-MNIST.

Regimes (``REGIMES``; real Fashion-MNIST images, deterministic from their seeds):

- ``canvas`` (primary): every item pasted at a random position of a 96×96 canvas among dimmer
  clutter fragments (``fashion-mnist-canvas``, :func:`distill.canvas.make_canvas_dataset`); teacher
  ``zoo:resnet10_narrow`` (ImageNet-style: 7×7 stride-2 stem + max-pool), student its factor-4
  aggressive-pool rewrite (strides [8, 1, 1, 2, 2, 1]) from :func:`passes.aggressive_pool`.
- ``plain``: 28×28 Fashion-MNIST, teacher ``zoo:resnet_tiny`` (stride-1 stem, docs/definitions.md §6), k=4.

Per regime: one teacher (seed 0), then the students, all trained from scratch with the same
recipe (SGD-Nesterov, one-cycle LR 0.1, batch 128, ``--epochs`` epochs, horizontal flips) and the
methods ``none`` (vanilla student), ``red-blocks`` (RED blocks, task loss only), ``kd`` (T=4),
``at``, ``fitnet`` (on the stage-map outputs), ``red`` and ``red+kd``. RED's alpha (1, 10, 50) and
placement (input+output, output) are chosen on the validation split (last-epoch accuracy, seed 0);
``red+kd`` uses the same alpha and placement and ``red-blocks`` the same placement. The primary regime
runs ``--seeds`` seeds per method (1 in the second). Reported: last-epoch test accuracy (mean ± std
over seeds), the deployed student's peak activation memory (deploy form, batch 1, RED blocks
included; :func:`memplan.analyze.analyze` of the student rebuilt from its run directory by
:meth:`distill.run.RunDir.load_model`), its parameters, training seconds per epoch (teacher forward
included, evaluation excluded) and the share of the teacher-vanilla gap closed,
``(acc - none) / (teacher - none)``. The canvas regime is the one calibrated in
:mod:`distill.canvas` (teacher ~85.7%, k=4 student ~78.9% at 8 epochs).

Resumable: every finished (regime, run, seed) is written at once (atomically) to the JSON file and
skipped on re-run; an interrupted training run continues from its ``last.pt``. Run directories go
under ``runs/distill_fashion_mnist/`` (ignored by git).

Usage:
    python benchmarks/distill_fashion_mnist.py                                   # everything
    python benchmarks/distill_fashion_mnist.py --regime canvas --methods none,red --seeds 1
    python benchmarks/distill_fashion_mnist.py --epochs 1 --train-subset 500 --out /tmp/smoke.json --runs /tmp/smoke
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from distill.config import TrainConfig
from distill.data import load_data
from distill.run import RunDir
from distill.trainer import train
from memplan.analyze import analyze
from memplan.io import write_text_atomic
from memplan.report import fmt_bytes
from passes import PLACEMENTS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "distill_fashion_mnist.json"
RUNS = ROOT / "runs" / "distill_fashion_mnist"
METHODS = ("none", "red-blocks", "kd", "at", "fitnet", "red", "red+kd")
RED_METHODS = ("red", "red+kd", "red-blocks")  # use RED's chosen placement (and alpha, red-blocks aside)
ALPHAS = (1.0, 10.0, 50.0)
EPOCHS = 15
SEEDS = 3
TRAINING = {"batch_size": 128, "lr": 0.1, "schedule": "onecycle", "val_fraction": 0.1}


@dataclass(frozen=True)
class Regime:
    """How one regime is built: data spec, teacher architecture, student factor, training subset."""

    data: str
    teacher: str
    factor: int
    train_subset: int | None
    description: str


REGIMES = {
    "canvas": Regime(
        data="fashion-mnist-canvas,canvas=96,clutter=2,scale=2-2",
        teacher="zoo:resnet10_narrow",
        factor=4,
        train_subset=20000,
        description="Fashion-MNIST items upscaled 2x (56 px) at random positions of a 96x96 canvas over 2 dimmer "
        "clutter fragments of other items (train canvases seed 0, test seed 1); a class-balanced training subset, "
        "6k validation canvases, the 10k test items; ImageNet-style resnet10_narrow teacher (stem stride 2 + "
        "max-pool), k=4 student (stem stride 8, strides [8,1,1,2,2,1])",
    ),
    "plain": Regime(
        data="fashion-mnist",
        teacher="zoo:resnet_tiny",
        factor=4,
        train_subset=6000,
        description="plain 28x28 Fashion-MNIST, a class-balanced training subset, 6k validation, 10k test; "
        "resnet_tiny teacher (stride-1 stem, stages 16/32/64 at 28/14/7 px), k=4 student (stem + 4x4 max-pool, "
        "7x7 everywhere)",
    ),
}
PRIMARY = "canvas"


# ---------------------------------------------------------------------------------------------- results file
class Results:
    """The JSON document: header, raw finished runs (``runs``) and the per-method summary rows."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        for key in ("epochs", "train_subsets"):
            if key in self.doc and self.doc[key] != header[key]:
                raise SystemExit(f"{path} holds results for {key}={self.doc[key]}, not {header[key]}; "
                                 "use another --out (and --runs)")
        self.doc.update(header)
        self.doc.setdefault("runs", {})

    def done(self, regime: str, label: str, seed: int) -> dict[str, Any] | None:
        """The finished run, also when another process recorded it since we started."""
        self._merge_from_disk()
        return self.doc["runs"].get(regime, {}).get(label, {}).get(str(seed))

    def _merge_from_disk(self) -> None:
        if self.path.exists():
            for regime, labels in json.loads(self.path.read_text()).get("runs", {}).items():
                for label, seeds in labels.items():
                    for seed, run in seeds.items():
                        self.doc["runs"].setdefault(regime, {}).setdefault(label, {}).setdefault(seed, run)

    def record(self, regime: str, label: str, seed: int, run: dict[str, Any]) -> None:
        self.doc["runs"].setdefault(regime, {}).setdefault(label, {})[str(seed)] = run
        self.save()

    def save(self) -> None:
        """Merge our runs into the file's under a lock, so several processes may share the file."""
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._merge_from_disk()
            for regime in self.doc["regimes"]:
                self.doc[regime] = summarize(self.doc["runs"].get(regime, {}), self.doc["seeds"][regime])
            write_text_atomic(self.path, json.dumps(self.doc, indent=2) + "\n")


def red_label(method: str, alpha: float | None, placement: str | None) -> str:
    """Run label: the method plus the RED settings it used."""
    parts = [f"alpha={alpha:g}"] if alpha is not None else []
    parts += [f"placement={placement}"] if placement is not None else []
    return f"{method}@{','.join(parts)}" if parts else method


def selection(runs: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """RED's candidates (seed 0) and the chosen one: best last-epoch validation accuracy, first on ties."""
    candidates = []
    for alpha in ALPHAS:
        for placement in PLACEMENTS:
            run = runs.get(red_label("red", alpha, placement), {}).get("0")
            if run is not None:
                candidates.append({"alpha": alpha, "placement": placement, "val_acc": run["val_acc"],
                                   "test_acc": run["test_acc"]})
    complete = len(candidates) == len(ALPHAS) * len(PLACEMENTS)
    chosen = max(candidates, key=lambda c: c["val_acc"]) if complete else None  # max keeps the first of ties
    return candidates, chosen


def method_label(method: str, chosen: dict[str, Any] | None) -> str | None:
    """The run label a method's row reads; None while RED's selection is incomplete."""
    if method not in RED_METHODS:
        return method
    if chosen is None:
        return None
    alpha = None if method == "red-blocks" else chosen["alpha"]
    return red_label(method, alpha, chosen["placement"])


def summarize(runs: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """One row per method (and the teacher) from the finished runs of a regime."""
    candidates, chosen = selection(runs)
    rows: dict[str, Any] = {}
    for method in ("teacher", *METHODS):
        label = method_label(method, chosen)
        done = [runs[label][str(s)] for s in seeds if label in runs and str(s) in runs[label]]
        if not done:
            continue
        acc = [r["test_acc"] for r in done]
        rows[method] = {
            "acc": acc,
            "mean": statistics.fmean(acc),
            "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "val_acc": [r["val_acc"] for r in done],
            "best_val": [{k: r[k] for k in ("best_epoch", "best_val_acc", "best_test_acc")} for r in done],
            "peak_bytes": done[0]["peak_bytes"],
            "params": done[0]["params"],
            "sec_per_epoch": statistics.fmean(r["sec_per_epoch"] for r in done),
            "gap_closed": None,
            "run": label,
        }
        if method in RED_METHODS:
            rows[method].update(alpha=None if method == "red-blocks" else chosen["alpha"],
                                placement=chosen["placement"])
    if "red" in rows:
        rows["red"]["selection"] = candidates
    if "teacher" in rows and "none" in rows:
        gap = rows["teacher"]["mean"] - rows["none"]["mean"]
        for row in rows.values():
            row["gap_closed"] = (row["mean"] - rows["none"]["mean"]) / gap if gap else None
    return rows


# ---------------------------------------------------------------------------------------------- training
def run_one(
    results: Results, runs_dir: Path, regime: str, label: str, seed: int, config: TrainConfig, shape: tuple[int, ...]
) -> dict[str, Any] | None:
    """Train one run (or continue its last.pt) unless the results file has it; record it at once.

    A run another process is training (it holds the run's lock file) is skipped: returns None.
    """
    done = results.done(regime, label, seed)
    if done is not None:
        return done
    out = runs_dir / regime / label / f"seed{seed}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"seed{seed}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[{regime}] {label} seed {seed}: another process is training it; skipped", flush=True)
            return None
        if results.done(regime, label, seed) is not None:  # recorded by another process meanwhile
            return results.done(regime, label, seed)
        return _train_and_record(results, out, regime, label, seed, config, shape)


def _train_and_record(
    results: Results, out: Path, regime: str, label: str, seed: int, config: TrainConfig, shape: tuple[int, ...]
) -> dict[str, Any]:
    resume = str(out) if (out / "last.pt").exists() else None
    print(f"[{regime}] {label} seed {seed}: training -> {out}", flush=True)
    started = time.perf_counter()
    config = TrainConfig(**{**asdict(config), "seed": seed, "out_dir": str(out), "resume": resume})
    result = train(config)
    model = RunDir(out).load_model()  # the deployed student as the run directory rebuilds it
    run = {
        "test_acc": result.last_test_acc,
        "val_acc": result.last_val_acc,
        "best_epoch": result.best_epoch,
        "best_val_acc": result.best_val_acc,
        "best_test_acc": result.best_test_acc,
        "sec_per_epoch": statistics.fmean(r["seconds"] for r in result.history),
        "peak_bytes": analyze(model, shape).peak_bytes,
        "params": sum(p.numel() for p in model.parameters()),
        "wall_seconds": time.perf_counter() - started,
        "run_dir": str(out),
    }
    results.record(regime, label, seed, run)
    print(f"[{regime}] {label} seed {seed}: test {run['test_acc']:.2f}%  val {run['val_acc']:.2f}%  "
          f"{run['sec_per_epoch']:.1f} s/epoch", flush=True)
    return run


def run_regime(
    results: Results, runs_dir: Path, name: str, methods: list[str], seeds: list[int], args: argparse.Namespace
) -> None:
    """Teacher, RED's alpha/placement selection (when a RED method is asked for), then every method and seed."""
    regime = REGIMES[name]
    subset = args.train_subset or regime.train_subset
    probe = load_data(regime.data, train_subset=10)
    shape = (1, probe.in_chans, *probe.input_size)
    del probe
    base = TrainConfig(data=regime.data, train_subset=subset, epochs=args.epochs, **TRAINING)
    teacher_cfg = TrainConfig(**{**asdict(base), "model": regime.teacher})
    teacher = run_one(results, runs_dir, name, "teacher", 0, teacher_cfg, shape)
    if teacher is None:
        raise SystemExit(f"[{name}] the teacher is being trained by another process; run again when it is done")
    student = {**asdict(base), "teacher": regime.teacher, "teacher_checkpoint": teacher["run_dir"],
               "factor": regime.factor}

    def student_cfg(method: str, alpha: float = 1.0, placement: str = PLACEMENTS[0]) -> TrainConfig:
        return TrainConfig(**{**student, "method": method, "alpha": alpha, "placement": placement})

    chosen = None
    if set(RED_METHODS) & set(methods):
        for alpha in ALPHAS:
            for placement in PLACEMENTS:
                cfg = student_cfg("red", alpha, placement)
                run_one(results, runs_dir, name, red_label("red", alpha, placement), 0, cfg, shape)
        _, chosen = selection(results.doc["runs"][name])
        print(f"[{name}] RED chosen on validation: alpha={chosen['alpha']:g}, placement={chosen['placement']}",
              flush=True)
    for seed in seeds:
        if args.only_seeds and seed not in args.only_seeds:
            continue
        for method in methods:
            settings = {"alpha": chosen["alpha"], "placement": chosen["placement"]} if method in RED_METHODS else {}
            run_one(results, runs_dir, name, method_label(method, chosen), seed, student_cfg(method, **settings), shape)


# ---------------------------------------------------------------------------------------------- report
def pooled_std(a: dict[str, Any], b: dict[str, Any]) -> float:
    return math.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2)


def table(doc: dict[str, Any], regime: str) -> str:
    """The regime's table (markdown) and, for the primary regime, the target verdict."""
    rows = doc.get(regime, {})
    seeds = doc["seeds"][regime]
    lines = [f"### {regime}{' (primary)' if regime == doc['primary'] else ''}: {doc['regimes'][regime]['description']}",
             f"{doc['train_subsets'][regime]} training images, {doc['epochs']} epochs, seeds {seeds}, last-epoch "
             f"test accuracy; device {doc['device']}", "",
             "| method | test acc (%) | n | test at best-val epoch (%) | deployed peak | params | s/epoch | gap closed |",
             "|---|---|---|---|---|---|---|---|"]
    for method, row in rows.items():
        extra = f" (α={row['alpha']:g}, {row['placement']})" if row.get("alpha") is not None else (
            f" ({row['placement']})" if row.get("placement") else "")
        best = statistics.fmean(b["best_test_acc"] for b in row["best_val"])
        gap = "-" if row["gap_closed"] is None else f"{100 * row['gap_closed']:.0f}%"
        lines.append(f"| {method}{extra} | {row['mean']:.2f} ± {row['std']:.2f} | {len(row['acc'])} | {best:.2f} | "
                     f"{fmt_bytes(row['peak_bytes'])} | {row['params']:,} | {row['sec_per_epoch']:.1f} | {gap} |")
    if "teacher" in rows and "none" in rows:
        lines.append(f"\nteacher - vanilla gap: {rows['teacher']['mean'] - rows['none']['mean']:.2f} points")
    if "red" in rows:
        lines.append("RED selection (seed 0, last-epoch val %): " + ", ".join(
            f"α={c['alpha']:g}/{c['placement']}: {c['val_acc']:.2f}" for c in rows["red"]["selection"]))
    verdict = target(rows) if regime == doc["primary"] else None
    if verdict is not None:
        lines.append(verdict["text"])
    return "\n".join(lines)


def target(rows: dict[str, Any]) -> dict[str, Any] | None:
    """Does RED (or red+kd) close >= 60% of the gap and beat kd, red-blocks, none by > one pooled std?

    Margins are ``(mean_red - mean_other) / pooled std``; undefined (None, target not met) with one seed.
    """
    candidates = [m for m in ("red", "red+kd") if m in rows]
    if not candidates or not {"teacher", "none", "kd", "red-blocks"} <= set(rows):
        return None
    best = max(candidates, key=lambda m: rows[m]["mean"])
    margins = {}
    for other in ("kd", "red-blocks", "none"):
        spread = pooled_std(rows[best], rows[other])
        margins[other] = (rows[best]["mean"] - rows[other]["mean"]) / spread if spread > 0 else None
    closed = rows[best]["gap_closed"]
    met = closed is not None and closed >= 0.6 and all(v is not None and v > 1 for v in margins.values())
    shown = ", ".join(f"{m} by {'n/a' if v is None else f'{v:.1f}'} pooled std" for m, v in margins.items())
    closed_text = "n/a" if closed is None else f"{100 * closed:.0f}%"
    text = (f"target: {best} closes {closed_text} of the gap (>= 60% needed) and beats {shown} (> 1 needed): "
            f"{'MET' if met else 'NOT MET'}")
    return {"method": best, "gap_closed": closed, "margins_in_pooled_std": margins, "met": met, "text": text}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regime", choices=[*REGIMES, "all"], default="all")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=SEEDS, help="seeds per method in the primary regime (1 elsewhere)")
    p.add_argument("--only-seeds", type=lambda t: [int(x) for x in t.split(",")], default=None,
                   help="train only these seeds (e.g. 1,2) to split one regime over processes; runs are locked")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--train-subset", type=int, help="training images per regime (default: the regime's)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    p.add_argument("--runs", type=Path, default=RUNS, help="directory of the run directories")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    torch.set_num_threads(args.threads)
    names = list(REGIMES) if args.regime == "all" else [args.regime]
    seeds = {name: list(range(args.seeds if name == PRIMARY else 1)) for name in REGIMES}
    results = Results(args.out, {
        "epochs": args.epochs,
        "train_subsets": {n: args.train_subset or r.train_subset for n, r in REGIMES.items()},
        "seeds": seeds,
        "primary": PRIMARY,
        "device": device_name(),
        "training": {**TRAINING, "optimizer": "SGD nesterov momentum 0.9, weight decay 5e-4", "augment": "hflip",
                     "kd_temperature": 4, "alphas": list(ALPHAS), "placements": list(PLACEMENTS),
                     "selection": "RED alpha and placement: best last-epoch validation accuracy, seed 0; red+kd "
                                  "reuses both, red-blocks the placement"},
        "regimes": {n: asdict(r) for n, r in REGIMES.items()},
    })
    for name in names:
        run_regime(results, args.runs, name, methods, seeds[name], args)
    results.doc["target"] = target(results.doc.get(PRIMARY, {}))
    results.save()
    for name in REGIMES:
        if results.doc.get(name):
            print("\n" + table(results.doc, name))


if __name__ == "__main__":
    main()
