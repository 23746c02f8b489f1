"""``memplan train MODEL --data SPEC``: train a model (a teacher) with the distill trainer.

Builds a :class:`distill.config.TrainConfig` from an optional YAML file, the flags and ``key=value``
overrides (any config key, later ones win), trains with a tqdm bar (on a terminal) and per-epoch
validation and test, and prints the last-epoch test accuracy with the best-on-validation epoch
beside it. The run directory (``--out``) holds ``config.yaml``, ``metrics.jsonl``, ``last.pt``,
``best.pt`` and ``student.pt``; ``--resume RUN`` continues it exactly where ``last.pt`` stopped. A run
directory is locked while a process trains into it. Model specs read from a file (``--config``, a
resumed run's ``config.yaml``) are limited to ``zoo:``/``torchvision:``/``timm:`` unless ``--trust-code``.

Distributed (DDP, one process per GPU or CPU group; ``--out`` is written by rank 0)::

    torchrun --nproc_per_node=2 -m memplan train zoo:resnet18_small --data cifar10:DATA --out runs/t

Example:
    $ memplan train zoo:resnet10_narrow --data fashion-mnist-canvas --epochs 15 --out runs/teacher
    $ memplan train zoo:resnet_tiny --data digits --epochs 3 --out runs/t image_size=16 lr=0.05
    $ memplan train --resume runs/teacher
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from distill.config import load_config
from memplan.cli import allow_intermixed, command
from memplan.errors import MemplanError

if TYPE_CHECKING:
    from distill.trainer import TrainResult


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Flags ``memplan train`` and ``memplan distill`` share (data, epochs, run directory, config)."""
    p.add_argument("--data", help="data spec: digits, fashion-mnist[:DIR], fashion-mnist-canvas[:DIR][,k=v...], "
                                  "cifar10:DIR, cifar100:DIR, stl10:DIR, imagefolder:DIR")
    p.add_argument("--epochs", type=int, help="training epochs")
    p.add_argument("--task", help="training task: classify (default) or diffusion (DDPM denoisers)")
    p.add_argument("--out", metavar="RUN", help="run directory (config.yaml, metrics.jsonl, last.pt, best.pt, "
                                                "student.pt)")
    p.add_argument("--config", metavar="YAML", help="base config file (TrainConfig keys)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last.pt")
    p.add_argument("--trust-code", action="store_true", help="allow model specs read from files (a config, a run "
                                                             "directory) to import code (FILE.py:fn, pkg.mod:fn)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lr=0.05 seed=1")
    allow_intermixed(p)


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The shared flags as ``key=value`` overrides (only those given)."""
    pairs = (("data", args.data), ("epochs", args.epochs), ("out_dir", args.out), ("resume", args.resume),
             ("task", args.task))
    return [f"{key}={value}" for key, value in pairs if value is not None]


def run_training(config_path: str | None, overrides: Sequence[str], trust_code: bool = False) -> TrainResult:
    """Load the config (file specs vetted by ``trust_code``), train, print the summary."""
    from distill.trainer import train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = train(load_config(config_path, overrides, trust_code=trust_code))
    print(summary(result))
    return result


def summary(result: TrainResult) -> str:
    """Run directory, last-epoch test accuracy and the best-on-validation epoch beside it.

    Tasks without accuracies (``diffusion``) report their last epoch's mean training loss terms.
    """
    if result.last_test_acc != result.last_test_acc:  # NaN: the task measures no accuracy
        loss = result.history[-1].get("train_loss", {}) if result.history else {}
        return (f"run              {result.run_dir or '(not saved)'}\n"
                f"train loss       {', '.join(f'{k} {v:.4f}' for k, v in loss.items())} (last epoch, {result.epochs})")
    return (
        f"run              {result.run_dir or '(not saved)'}\n"
        f"test accuracy    {result.last_test_acc:.2f}% (last epoch, {result.epochs})   "
        f"best val {result.best_val_acc:.2f}% at epoch {result.best_epoch} (test {result.best_test_acc:.2f}%)"
    )


@command("train", "train a model (a teacher) on a dataset: run directory, checkpoints, resume")
def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``memplan train``."""
    p.add_argument("model", nargs="?", help="zoo:NAME, FILE.py:CALLABLE or pkg.module:CALLABLE (optional with "
                                            "--resume or --config)")
    add_run_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``memplan train``."""
    overrides = list(args.overrides)
    if args.model and "=" in args.model:  # argparse gives the first key=value to the optional MODEL
        overrides.insert(0, args.model)
        args.model = None
    if not (args.model or args.resume or args.config):
        raise MemplanError("give MODEL (e.g. zoo:resnet_tiny), --config YAML or --resume RUN")
    model = [f"model={args.model}"] if args.model else []
    run_training(args.config, [*model, *flag_overrides(args), *overrides], trust_code=args.trust_code)
    return 0
