"""Train a teacher (``method=none``) or distil a student, on one process or under ``torchrun``.

Usage::

    memplan train MODEL --data SPEC --out RUN [key=value ...]
    python -m distill.trainer CONFIG.yaml key=value ...
    python -m distill.trainer resume=RUN_DIR                  # continue a run where last.pt stopped
    torchrun --nproc_per_node=2 -m distill.trainer CONFIG.yaml

The run directory (``out_dir``, :class:`distill.run.RunDir`) is locked while a run writes it and
holds the resolved ``config.yaml``; ``metrics.jsonl`` with one JSON object per epoch (``epoch``,
``train_loss`` {``total``, ``task``, one key per method term}, ``train_acc``, ``val_acc``,
``test_acc`` in percent, ``lr`` at the epoch's end, ``seconds``, ``images_per_s``); ``last.pt``,
``best.pt``, ``student.pt`` and, for derived students, ``recipe.json``. Data order, augmentation and
the global RNG are drawn from generators seeded by ``(seed, epoch, rank)``, so a resumed run
reproduces an uninterrupted one. On a terminal a tqdm bar shows each epoch; otherwise one aligned
line per epoch is logged.

**Derived students.** With ``factor`` (or ``recipe``) the student is the teacher architecture
rewritten by :func:`passes.aggressive_pool` (or :func:`passes.apply_recipe`), freshly initialised;
methods that need RED blocks get them from :func:`distill.red.attach_red` at ``placement``, and
feature methods tap the stage map (RED block outputs, or the shrunk stage outputs for FitNet/AT)
against the teacher maps of equal size, so ``method`` plus ``factor`` is all a run needs.
:meth:`distill.run.RunDir.load_model` rebuilds the trained model.

**Tasks.** ``task`` picks the training loop from :data:`TASKS` (``classify``: image classification;
``diffusion``: DDPM denoisers and their students, :mod:`distill.diffusion_task`).

>>> net = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
>>> r = train(TrainConfig(model=net, data="digits", epochs=1, batch_size=64, lr=0.05))
>>> r.epochs, len(r.history), r.last_test_acc > 50
(1, 1, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from distill.config import ConfigError, TrainConfig, check_config, load_config, read_yaml
from distill.data import ImageDataset, Preprocess, load_data
from distill.distributed import Dist, derive_seed, rng_state, set_rng_state, setup
from distill.features import FeatureFn
from distill.losses import LossInputs, Objective, build_objective
from distill.models import derive_student, feature_fns, filled_kwargs
from distill.red import REDBlock
from distill.run import RunDir, load_weights, state_digest
from distill.schedules import SCHEDULES
from memplan.errors import MemplanError
from memplan.io import load_torch
from memplan.registry import Registry
from memplan.specs import build_model
from passes import Student

__all__ = ["TASKS", "TrainResult", "format_epoch", "main", "train"]

log = logging.getLogger("distill.trainer")

_RESUME_MUTABLE = {"resume", "out_dir", "num_workers", "device"}


@dataclass
class TrainResult:
    """Outcome of ``train``: accuracies in percent, the trained student and its state digest."""

    run_dir: Path | None
    epochs: int
    last_val_acc: float
    last_test_acc: float
    best_epoch: int
    best_val_acc: float
    best_test_acc: float
    history: list[dict[str, Any]]
    state_digest: str
    rank_digests: list[str]
    student: nn.Module = field(repr=False)


Task = Callable[[TrainConfig, Dist, torch.device], TrainResult]
TASKS: Registry[Task] = Registry("task")


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.model`` with ``config.method`` for ``config.task``; see the module docstring."""
    cfg = check_config(config)
    task = TASKS[cfg.task]
    env, device = setup(cfg.device)
    try:
        return task(cfg, env, device)
    finally:
        if env.owns_group:
            dist.destroy_process_group()


def format_epoch(record: dict[str, Any], epochs: int) -> str:
    """One aligned, human-readable line for an epoch's metrics (``metrics.jsonl`` keeps the JSON).

    >>> format_epoch({"epoch": 3, "train_loss": {"total": 0.41, "task": 0.3, "red": 0.11}, "train_acc": 88.2,
    ...               "val_acc": 87.9, "test_acc": 87.5, "lr": 0.01, "seconds": 12.3, "images_per_s": 1234.0}, 15)
    'epoch  3/15  loss 0.4100 (red 0.1100, task 0.3000)  train 88.20%  val 87.90%  test 87.50%  lr 0.0100  1234 img/s  12.3 s'
    """
    width = len(str(epochs))
    losses = dict(record.get("train_loss", {}))
    total = losses.pop("total", math.nan)
    terms = ", ".join(f"{k} {v:.4f}" for k, v in sorted(losses.items()))
    return (f"epoch {record['epoch']:>{width}}/{epochs}  loss {total:.4f}" + (f" ({terms})" if terms else "")
            + f"  train {record['train_acc']:.2f}%  val {record['val_acc']:.2f}%  test {record['test_acc']:.2f}%"
            f"  lr {record['lr']:.4f}  {record['images_per_s']:.0f} img/s  {record['seconds']:.1f} s")


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class _TrainStep(nn.Module):
    """Student forward plus objective, wrapped as one module so DDP syncs regressor grads too."""

    def __init__(self, student: nn.Module, features: FeatureFn, objective: Objective) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self.features = features

    def forward(
        self, x: Tensor, labels: Tensor, teacher_logits: Tensor | None, teacher_feats: list[Tensor]
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        logits, feats = self.features(self.student, x)
        out = self.objective(LossInputs(logits, labels, teacher_logits, feats, teacher_feats))
        return logits, out.total, out.terms


@dataclass
class _Teacher:
    """The frozen teacher and its feature function."""

    model: nn.Module
    features: FeatureFn

    @torch.no_grad()
    def __call__(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self.features(self.model, x)


def _loader(
    dataset: Dataset, cfg: TrainConfig, device: torch.device, generator: torch.Generator, sampler: Any = None
) -> DataLoader:
    """Batches in ``sampler`` order (full batches only) or, without a sampler, in dataset order."""
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=sampler is not None,
        pin_memory=device.type == "cuda",
        generator=generator,
    )


def _batches(loader: DataLoader, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    for images, labels in loader:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


@torch.no_grad()
def _evaluate(
    step: _TrainStep,
    dataset: ImageDataset,
    preprocess: Preprocess,
    cfg: TrainConfig,
    env: Dist,
    device: torch.device,
) -> float:
    """Top-1 accuracy (%) of the student; ranks evaluate interleaved shards and sum the counts."""
    step.eval()
    shard = Subset(dataset, range(env.rank, len(dataset), env.world))
    loader = _loader(shard, cfg, device, torch.Generator().manual_seed(0))
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for images, labels in _batches(loader, device):
        logits, _ = step.features(step.student, preprocess(images, train=False))
        counts += torch.stack(
            [(logits.argmax(1) == labels).sum(), torch.tensor(labels.numel(), device=device)]
        )
    if env.active:
        dist.all_reduce(counts)
    step.train()
    return 100.0 * float(counts[0] / counts[1].clamp(min=1))


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if not cfg.amp:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class _Session:
    """One training run: built from the config, then resumed (optionally) and run epoch by epoch."""

    def __init__(self, cfg: TrainConfig, env: Dist, device: torch.device) -> None:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.env, self.device = env, device
        self.bundle = load_data(
            cfg.data,
            val_fraction=cfg.val_fraction,
            train_subset=cfg.train_subset,
            seed=cfg.seed,
            image_size=cfg.image_size,
        )
        self.preprocess = self.bundle.preprocess
        options = {**cfg.method_options, "red": {**cfg.method_options.get("red", {}), "alpha": cfg.alpha}}
        self.objective = build_objective(
            cfg.method, task_weight=cfg.task_weight, distill_weight=cfg.distill_weight, options=options
        )
        self.cfg = cfg = dataclasses.replace(
            cfg,
            task_weight=self.objective.task_weight,
            model_kwargs=filled_kwargs(cfg.model, cfg.model_kwargs, self.bundle)
            if cfg.model
            else cfg.model_kwargs,
            teacher_kwargs=filled_kwargs(cfg.teacher, cfg.teacher_kwargs, self.bundle)
            if cfg.teacher
            else cfg.teacher_kwargs,
        )

        # graph rewrites (student derivation, RED blocks, feature taps) happen here, before any DDP wrapping
        self.derived: Student | None = None
        if cfg.factor is not None or cfg.recipe is not None:
            self.derived, self.student = derive_student(cfg, self.bundle, self.objective.needs_red_blocks)
        else:
            self.student = build_model(cfg.model, cfg.model_kwargs)
        if self.objective.needs_red_blocks and not any(
            isinstance(m, REDBlock) for m in self.student.modules()
        ):
            raise ConfigError(f"method {cfg.method!r} needs a student with REDBlock modules attached")
        student_fn, teacher_fn = feature_fns(cfg, self.objective, self.student, self.derived)
        self.teacher = self._build_teacher(teacher_fn) if self.objective.needs_teacher else None
        self.step = _TrainStep(student_fn.prepare(self.student), student_fn, self.objective).to(device)
        self._setup_objective()

        self.optimizer = torch.optim.SGD(
            self.step.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
        )
        per_process = len(self.bundle.train) // env.world
        if per_process < cfg.batch_size:
            raise ConfigError(
                f"batch_size {cfg.batch_size} exceeds the {per_process} training images per process"
            )
        self.scheduler = SCHEDULES[cfg.schedule](self.optimizer, cfg, per_process // cfg.batch_size)
        self.amp_dtype = _amp_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.run_dir = RunDir(cfg.out_dir) if cfg.out_dir else None
        self.writes = env.main and self.run_dir is not None
        self.start_epoch = 0
        self.best: dict[str, Any] = {"epoch": 0, "val_acc": -math.inf, "test_acc": math.nan}

    def _build_teacher(self, features: FeatureFn) -> _Teacher:
        cfg = self.cfg
        if cfg.teacher is None or cfg.teacher_checkpoint is None:
            raise ConfigError(f"method {cfg.method!r} needs teacher and teacher_checkpoint")
        model = build_model(cfg.teacher, cfg.teacher_kwargs)
        load_weights(model, cfg.teacher_checkpoint)
        model.eval().requires_grad_(False)
        return _Teacher(features.prepare(model).to(self.device).eval(), features)

    def _setup_objective(self) -> None:
        """Run two training images through both models so the objective sees the feature shapes."""
        probe = self.preprocess(self.bundle.train.images[:2].to(self.device), train=False)
        self.step.eval()
        with torch.no_grad():
            logits, student_feats = self.step.features(self.step.student, probe)
        self.step.train()
        if not isinstance(logits, Tensor) or tuple(logits.shape) != (len(probe), self.bundle.num_classes):
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ConfigError(f"the model's output {got} cannot be used for classification: expected logits of "
                              f"shape (N, {self.bundle.num_classes}) for the {self.bundle.num_classes} classes of "
                              f"{self.cfg.data!r}")
        self.objective.setup(student_feats, self.teacher(probe)[1] if self.teacher else [])
        self.objective.to(self.device)

    def _resume(self, run: RunDir) -> None:
        ckpt = load_torch(run / "last.pt", "checkpoint")
        try:
            self.student.load_state_dict(ckpt["model"])
            self.objective.load_state_dict(ckpt["objective"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"])
            self.start_epoch, self.best = int(ckpt["epoch"]), dict(ckpt["best"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"{run / 'last.pt'}: not a checkpoint of this run ({first[:200]})") from None

    def _start(self, run: RunDir) -> None:
        """Check that ``run`` may be (re)started with this config, then write its config and info."""
        cfg = self.cfg
        config = cfg.to_dict()
        if cfg.resume:
            if not run.has("last.pt"):
                raise ConfigError(f"{run / 'last.pt'}: nothing to resume")
            if run.has(RunDir.CONFIG):
                old = read_yaml(run / RunDir.CONFIG)
                changed = sorted(k for k in config if k not in _RESUME_MUTABLE and old.get(k) != config[k])
                if changed:
                    raise ConfigError(f"resume: config differs from {run / RunDir.CONFIG} in {changed}")
        elif run.has("last.pt"):
            raise ConfigError(f"{run.path} already holds a run; pass resume={run.path} or pick a new out_dir")
        if not self.writes:
            return
        run.write_config(config)
        run.write_info("distill" if self.derived is not None else "train",
                       (1, self.bundle.in_chans, *self.bundle.input_size))
        if self.derived is not None:
            run.write_recipe(self.derived.recipe, cfg.placement if self.objective.needs_red_blocks else None)

    def run(self) -> TrainResult:
        run = self.run_dir
        with run.lock() if self.writes else contextlib.nullcontext():
            return self._run()

    def _run(self) -> TrainResult:
        cfg, env, run = self.cfg, self.env, self.run_dir
        if run is not None:
            self._start(run)
        if cfg.resume:
            self._resume(RunDir(cfg.resume))
        history = (run.truncate_history(self.start_epoch) if self.writes else
                   [r for r in run.history() if r.get("epoch", 0) <= self.start_epoch]) if run is not None else []
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        model = DistributedDataParallel(self.step, device_ids=device_ids) if env.active else self.step
        for epoch in range(self.start_epoch, cfg.epochs):
            record = self._train_epoch(model, epoch)
            record["val_acc"] = _evaluate(self.step, self.bundle.val, self.preprocess, cfg, env, self.device)
            record["test_acc"] = _evaluate(
                self.step, self.bundle.test, self.preprocess, cfg, env, self.device
            )
            history.append(record)
            if self.writes:
                run.append_metrics(record)
            if env.main:
                log.info("%s", format_epoch(record, cfg.epochs))
            self._checkpoint(epoch + 1, record)

        final_state = _cpu_state(self.student)
        if self.writes:
            run.save("student.pt", final_state)
        digest = state_digest(final_state)
        digests = [digest]
        if env.active:
            gathered: list[Any] = [None] * env.world
            dist.all_gather_object(gathered, digest)
            digests = [str(d) for d in gathered]
            dist.barrier()
        return TrainResult(
            run_dir=Path(cfg.out_dir) if cfg.out_dir else None,
            epochs=cfg.epochs,
            last_val_acc=history[-1]["val_acc"],
            last_test_acc=history[-1]["test_acc"],
            best_epoch=self.best["epoch"],
            best_val_acc=self.best["val_acc"],
            best_test_acc=self.best["test_acc"],
            history=history,
            state_digest=digest,
            rank_digests=digests,
            student=self.student,
        )

    def _train_epoch(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        """One pass over this rank's shard; returns the epoch's metrics summed over ranks."""
        cfg, env, device = self.cfg, self.env, self.device
        # every random draw of the epoch derives from (seed, epoch, rank): resuming is exact
        torch.manual_seed(derive_seed(cfg.seed, epoch, env.rank))
        sampler = DistributedSampler(
            self.bundle.train,
            num_replicas=env.world,
            rank=env.rank,
            shuffle=True,
            seed=cfg.seed,
            drop_last=True,
        )
        sampler.set_epoch(epoch)
        loader_rng = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, env.rank, 1))
        loader = _loader(self.bundle.train, cfg, device, loader_rng, sampler)
        augment_rng = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, env.rank, 2))
        sums: dict[str, Tensor] = {}
        correct = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        started = time.perf_counter()
        show_bar = env.main and sys.stderr.isatty()
        bar = tqdm(
            _batches(loader, device),
            total=len(loader),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not show_bar,
            leave=False,
        )
        for i, (images, labels) in enumerate(bar):
            x = self.preprocess(images, train=True, generator=augment_rng)
            with torch.autocast(
                device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
            ):
                teacher_logits, teacher_feats = self.teacher(x) if self.teacher else (None, [])
                logits, total, terms = model(x, labels, teacher_logits, teacher_feats)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            seen += labels.numel()
            for name, value in {"total": total, **terms}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().double() * labels.numel()
            correct += (logits.argmax(1) == labels).sum()
            if show_bar and (i % 10 == 0 or i == len(loader) - 1):
                bar.set_postfix(
                    loss=f"{float(sums['total']) / seen:.4f}",
                    acc=f"{100 * float(correct) / seen:.2f}",
                    img_s=f"{seen / (time.perf_counter() - started):.0f}",
                )
        bar.close()
        names = sorted(sums)
        totals = torch.stack(
            [sums[k] for k in names] + [correct, torch.tensor(float(seen), device=device).double()]
        )
        if env.active:
            dist.all_reduce(totals)
            for buffer in self.step.student.buffers():  # BN statistics: rank 0's, everywhere
                dist.broadcast(buffer, 0)
        seconds = time.perf_counter() - started
        images = float(totals[-1])
        return {
            "epoch": epoch + 1,
            "train_loss": {k: float(totals[i]) / images for i, k in enumerate(names)},
            "train_acc": 100.0 * float(totals[-2]) / images,
            "lr": float(self.scheduler.get_last_lr()[0]),
            "seconds": seconds,
            "images_per_s": images / seconds,
        }

    def _checkpoint(self, epoch: int, record: dict[str, Any]) -> None:
        if record["val_acc"] > self.best["val_acc"]:
            self.best = {"epoch": epoch, "val_acc": record["val_acc"], "test_acc": record["test_acc"]}
            if self.writes:
                self.run_dir.save("best.pt", {"model": _cpu_state(self.student), **self.best})
        if not self.writes:
            return
        self.run_dir.save(
            "last.pt",
            {
                "epoch": epoch,
                "model": _cpu_state(self.student),
                "objective": _cpu_state(self.objective),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "best": self.best,
                "rng": rng_state(),
            }
        )


@TASKS.register("classify")
def classify(cfg: TrainConfig, env: Dist, device: torch.device) -> TrainResult:
    """Image classification: cross-entropy plus the method's distillation terms (module docstring)."""
    return _Session(cfg, env, device).run()


import distill.diffusion_task  # noqa: E402, F401 - registers the "diffusion" task (it imports TASKS from here)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m distill.trainer [--trust-code] [CONFIG.yaml] key=value ...``; prints a JSON summary."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.split("\n\n>>>")[0])
        return 0 if args else 2
    trust_code = "--trust-code" in args
    args = [a for a in args if a != "--trust-code"]
    paths = [a for a in args if "=" not in a]
    if len(paths) > 1:
        print(f"error: more than one config file: {paths}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    try:
        config = load_config(paths[0] if paths else None, [a for a in args if "=" in a], trust_code=trust_code)
        result = train(config)
    except MemplanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        skip = {"student", "history", "run_dir"}
        summary = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name not in skip}
        print(json.dumps({"run_dir": str(result.run_dir) if result.run_dir else None, **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
