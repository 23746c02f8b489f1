"""``memplan distill --teacher RUN (--factor K | --recipe FILE) --method red``: train a memory-reduced student.

The student is the teacher's architecture rewritten by the aggressive-pooling pass (docs/definitions.md §4) —
``--factor K`` or a saved ``--recipe`` — trained from scratch with a method of the
:mod:`distill.losses` registry (``none``, ``red-blocks``, ``kd``, ``at``, ``fitnet``, ``red``,
``red+kd``...). RED blocks are attached by graph rewriting at the stage map (``--placement``) and stay
in the student; RED, FitNet and AT compare student and teacher maps of equal size. ``--teacher`` is a
run directory of ``memplan train`` (architecture, data and weights from its ``config.yaml`` and
``student.pt``) or a checkpoint file in one (``best.pt``); a checkpoint elsewhere needs
``teacher=SPEC``. ``--data`` defaults to the teacher's. The run directory adds ``recipe.json`` to
``memplan train``'s files; ``distill.run.RunDir(RUN).load_model()`` rebuilds the student from it.

Example:
    $ memplan distill --teacher runs/teacher --factor 4 --method red --alpha 10 --epochs 15 --out runs/red
    $ memplan distill --teacher runs/teacher --recipe runs/s/recipe.json --method kd --out runs/kd seed=1
    $ memplan distill --resume runs/red
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distill.run import RunDir
from memplan.cli import command
from memplan.commands.train import add_run_arguments, flag_overrides, run_training
from memplan.errors import MemplanError
from passes import PLACEMENTS


def teacher_overrides(path: str, trust_code: bool = False) -> list[str]:
    """``teacher``, ``teacher_kwargs``, ``teacher_checkpoint``, ``data``, ``image_size`` from a teacher run.

    ``path`` is a run directory or a checkpoint file in one; a checkpoint elsewhere gives only
    ``teacher_checkpoint`` (the architecture then comes from ``teacher=SPEC``).
    """
    given = Path(path)
    if given.is_file() and not RunDir(given.parent).has(RunDir.CONFIG):
        return [f"teacher_checkpoint={given}"]
    run, weights = RunDir.from_checkpoint(given)
    cfg = run.config(trust_code=trust_code)
    if not isinstance(cfg.model, str) or not cfg.model:
        raise MemplanError(f"teacher run '{run.path}' names no model architecture (is it a derived student?)")
    return [
        f"teacher={cfg.model}",
        f"teacher_kwargs={json.dumps(cfg.model_kwargs)}",
        f"teacher_checkpoint={run / weights}",
        f"data={cfg.data}",
        f"image_size={cfg.image_size}",
    ]


@command("distill", "train an aggressive-pooling student of a teacher with RED, KD, AT, FitNet... (resumable)")
def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``memplan distill``."""
    p.add_argument("--teacher", metavar="RUN_OR_CKPT", help="teacher run directory or checkpoint file")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--factor", type=int, help="k: the student's stem downsamples k times more (2, 4 or 8)")
    how.add_argument("--recipe", metavar="FILE", help="a recipe.json (memplan student --out, or a run directory's)")
    p.add_argument("--method", help="distillation method(s), e.g. red, red+kd, kd, at, fitnet, red-blocks, none "
                                    "(default red)")
    p.add_argument("--placement", choices=PLACEMENTS, help="RED blocks at the input and output of matched "
                                                           "stages (default), or at their output only")
    p.add_argument("--alpha", type=float, help="weight of the RED loss (default 1)")
    add_run_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``memplan distill``."""
    if args.resume is None and args.teacher is None:
        raise MemplanError("give --teacher RUN_OR_CKPT with --factor K or --recipe FILE (or --resume RUN)")
    if args.resume is None and args.factor is None and args.recipe is None:
        raise MemplanError("give --factor K or --recipe FILE: the student is derived from the teacher")
    teacher = teacher_overrides(args.teacher, args.trust_code) if args.teacher else []
    method = args.method or ("red" if args.resume is None else None)
    flags = (("factor", args.factor), ("recipe", args.recipe), ("method", method),
             ("placement", args.placement), ("alpha", args.alpha))
    derived = [f"{key}={value}" for key, value in flags if value is not None]
    run_training(args.config, [*teacher, *derived, *flag_overrides(args), *args.overrides], args.trust_code)
    return 0
