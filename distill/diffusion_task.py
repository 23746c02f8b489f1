"""The trainer's ``diffusion`` task: train a DDPM denoiser (teacher) or distil its k-factor student.

``memplan train zoo:ddpm_unet_small --task diffusion --data fashion-mnist --out RUN lr=1e-3`` trains a
teacher; ``memplan distill --task diffusion --teacher RUN --factor 2 --method red|none|output --out RUN2``
its student (:func:`distill.diffusion_student.diffusion_student`, initialised from the teacher's
weights). How :class:`~distill.config.TrainConfig` keys read here:

- ``data``: uint8 images scaled to [-1, 1], zero-padded (black) to ``image_size`` (default: 32, or the
  image side when larger); train and validation splits both train (labels are unused).
- ``epochs`` × ``ceil(N / batch_size)`` Adam steps at ``lr`` (linear warm-up; pick ~1e-3, not the
  classification default), ``seed``, ``task_weight`` / ``distill_weight`` (0.5 / 0.5 for
  ``output`` and ``red``).
- ``method_options.diffusion``: ``ema`` (0.999), ``warmup`` (100 steps), ``red_loss`` (``cosine`` or
  ``mse``), ``sites`` (RED sites: 6 or 2), ``checkpoint_every`` (200 steps).
- ``out_dir``: ``last.pt`` (resumable, every ``checkpoint_every`` steps), ``student.pt`` (the EMA
  weights), ``metrics.jsonl`` (one record per epoch: mean loss terms), ``config.yaml``.

Example:
    >>> from distill.config import TrainConfig
    >>> from distill.trainer import train
    >>> r = train(TrainConfig(model="zoo:ddpm_unet_small", task="diffusion", data="digits", epochs=1,
    ...                       batch_size=512, lr=1e-3, model_kwargs={"base_channels": 8, "norm_groups": 4},
    ...                       train_subset=100, image_size=16))
    >>> r.epochs, sorted(r.history[0]["train_loss"])
    (1, ['denoise', 'total'])
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from distill.config import ConfigError, TrainConfig
from distill.data import load_data
from distill.diffusion import METHODS, RED_LOSSES, DiffusionObjective, pad_to_unit_range, train_denoiser
from distill.diffusion_student import SITE_PLACEMENTS, diffusion_student, red_student
from distill.distributed import Dist
from distill.run import RunDir, load_weights, state_digest
from distill.trainer import TASKS, TrainResult
from memplan.specs import build_model, resolve_factory

__all__ = ["OPTIONS", "diffusion"]

OPTIONS: dict[str, Any] = {"ema": 0.999, "warmup": 100, "red_loss": "cosine", "sites": 6, "checkpoint_every": 200}


def _options(cfg: TrainConfig) -> dict[str, Any]:
    given = dict(cfg.method_options.get("diffusion", {}))
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"method_options.diffusion: unknown keys {unknown} (known: {sorted(OPTIONS)})")
    opts = {**OPTIONS, **given}
    if opts["red_loss"] not in RED_LOSSES:
        raise ConfigError(f"method_options.diffusion.red_loss must be one of {list(RED_LOSSES)}")
    if opts["sites"] not in SITE_PLACEMENTS:
        raise ConfigError(f"method_options.diffusion.sites must be one of {sorted(SITE_PLACEMENTS)}")
    if cfg.method not in METHODS:
        raise ConfigError(f"the diffusion task's methods are {list(METHODS)}, got '{cfg.method}'")
    return opts


def _build(spec: Any, kwargs: dict[str, Any], in_chans: int) -> nn.Module:
    """The denoiser ``spec`` names, its ``in_chans`` filled from the data (output channels = input's)."""
    kwargs = dict(kwargs)
    try:
        params = inspect.signature(resolve_factory(spec)).parameters
    except (TypeError, ValueError):
        params = {}
    if ("in_chans" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())) and "in_chans" not in kwargs:
        kwargs["in_chans"] = in_chans
    return build_model(spec, kwargs)


@TASKS.register("diffusion")
def diffusion(cfg: TrainConfig, env: Dist, device: torch.device) -> TrainResult:
    """Train a denoiser (``model``) or a derived student (``teacher`` + ``factor``): module docstring."""
    opts = _options(cfg)
    if env.world > 1:
        raise ConfigError("the diffusion task runs in one process (no torchrun)")
    if cfg.recipe is not None:
        raise ConfigError("the diffusion task derives its student with factor, not a recipe")
    bundle = load_data(cfg.data, val_fraction=cfg.val_fraction, train_subset=cfg.train_subset, seed=cfg.seed)
    images = torch.cat([bundle.train.images, bundle.val.images])
    if cfg.image_size is not None and cfg.image_size != images.shape[-1]:
        images = torch.nn.functional.interpolate(images.float(), size=min(cfg.image_size, images.shape[-1]),
                                                 mode="bilinear", antialias=True).round().clamp(0, 255).byte()
    size = cfg.image_size or max(32, *images.shape[-2:])
    x = pad_to_unit_range(images, size)
    shape = (1, x.shape[1], size, size)
    torch.manual_seed(cfg.seed)
    teacher = None
    if cfg.factor is not None:
        if cfg.teacher is None:
            raise ConfigError("factor needs teacher")
        teacher = _build(cfg.teacher, cfg.teacher_kwargs, x.shape[1])
        if cfg.teacher_checkpoint is not None:
            load_weights(teacher, cfg.teacher_checkpoint)
        student = diffusion_student(teacher.eval(), shape, factor=cfg.factor)
        model, s_taps, t_taps = (red_student(student, opts["sites"]) if cfg.method in ("red", "red-blocks")
                                 else (student.module, [], []))
        if cfg.method == "red-blocks":
            s_taps, t_taps = [], []
    else:
        if cfg.method != "none":
            raise ConfigError(f"method '{cfg.method}' distils a student: give teacher and factor")
        model, s_taps, t_taps = _build(cfg.model, cfg.model_kwargs, x.shape[1]), [], []
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    objective = DiffusionObjective(cfg.method, red_loss=opts["red_loss"], task_weight=cfg.task_weight,
                                   distill_weight=cfg.distill_weight)
    run = RunDir(cfg.out_dir) if cfg.out_dir else None

    def fit() -> TrainResult:
        out = train_denoiser(
            model.to(device), x, steps=cfg.epochs * steps_per_epoch, batch_size=cfg.batch_size, lr=cfg.lr,
            warmup=opts["warmup"], ema_decay=opts["ema"], objective=objective, teacher=teacher,
            student_taps=s_taps, teacher_taps=t_taps, seed=cfg.seed, run_dir=run.path if run else None,
            checkpoint_every=opts["checkpoint_every"])
        history = []
        for epoch in range(cfg.epochs):
            chunk = out.losses[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch]
            history.append({"epoch": epoch + 1, "train_loss": {k: sum(r[k] for r in chunk) / len(chunk)
                                                               for k in chunk[0]},
                            "seconds_per_step": out.seconds_per_step})
        ema_state = {k: v.detach().cpu() for k, v in out.ema.state_dict().items()}
        if run is not None:
            run.write_config(cfg.to_dict())
            run.write_info("distill" if teacher is not None else "train", shape)
            run.save("student.pt", ema_state)
            if not run.history():
                for record in history:
                    run.append_metrics(record)
        nan = float("nan")
        digest = state_digest(ema_state)
        return TrainResult(run.path if run else None, cfg.epochs, nan, nan, cfg.epochs, nan, nan, history,
                           digest, [digest], out.ema)

    if run is None:
        return fit()
    with run.lock():
        return fit()
