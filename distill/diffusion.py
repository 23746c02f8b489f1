"""Denoising diffusion task: DDPM ε-prediction, EMA weights, DDIM sampling, and student distillation.

- :class:`NoiseSchedule`: DDPM's forward process with ``T`` steps and a linear β schedule
  (1e-4 .. 0.02 for T=1000, Ho et al. 2020); ``q_sample`` noises clean images, ``ddim_sample``
  generates images with DDIM (Song et al. 2021) over ``steps`` evenly spaced time steps; with
  ``eta=0`` the sample is a deterministic function of the seed.
- :class:`EMA`: an exponential moving average of the weights, ``decay_n = min(decay, (1+n)/(10+n))``
  (the warm-up keeps early averages from sticking to the random init).
- :class:`DiffusionObjective`: the per-batch loss of a denoiser, for the methods in ``METHODS``:
  ``none`` (``MSE(ε_s, ε)``), ``red-blocks`` (the same loss for a student carrying RED blocks: their
  capacity without the RED loss), ``output`` (the response-based baseline, the student's ε regressed on
  the frozen teacher's ε), ``red`` (RED blocks at the stage-map sites and ReDistill's loss: the
  channel-mean maps of each RED output against the teacher feature of equal size, cosine
  (``distill.red.red_loss``) or MSE, averaged over sites). Distillation methods weight
  ``task_weight * denoise + distill_weight * distill``, 0.5 / 0.5 by default (docs/definitions.md §5).
- :func:`train_denoiser`: a resumable training loop (checkpoint in ``run_dir/last.pt``; a rerun
  continues from it, bit-for-bit, including the data order).

Example:
    >>> import torch
    >>> s = NoiseSchedule(T=10)
    >>> x0 = torch.zeros(2, 1, 4, 4)
    >>> s.q_sample(x0, torch.tensor([0, 9]), torch.ones_like(x0)).shape
    torch.Size([2, 1, 4, 4])
    >>> net = lambda x, t: torch.zeros_like(x)
    >>> a = s.ddim_sample(net, (3, 1, 4, 4), steps=5, seed=1)
    >>> torch.equal(a, s.ddim_sample(net, (3, 1, 4, 4), steps=5, seed=1)), a.shape
    (True, torch.Size([3, 1, 4, 4]))
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.features import FeatureTap
from distill.red import red_loss

__all__ = ["METHODS", "RED_LOSSES", "DiffusionObjective", "EMA", "NoiseSchedule", "TrainOutcome",
           "pad_to_unit_range", "train_denoiser"]

METHODS = ("none", "output", "red", "red-blocks")
RED_LOSSES = ("cosine", "mse")
Denoiser = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class NoiseSchedule:
    """DDPM forward process: ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε`` with linear β_t, t in [0, T)."""

    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if self.T < 1 or not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(f"bad noise schedule T={self.T}, betas {self.beta_start}..{self.beta_end}")

    @property
    def alphas_cumprod(self) -> Tensor:
        """ᾱ_t for t = 0 .. T-1 (float64 products, returned as float32)."""
        betas = torch.linspace(self.beta_start, self.beta_end, self.T, dtype=torch.float64)
        return torch.cumprod(1.0 - betas, 0).float()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Noised images at integer time steps ``t`` (shape ``(N,)``)."""
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    def timesteps(self, steps: int) -> list[int]:
        """The DDIM time steps, descending: ``steps`` evenly spaced points of [0, T)."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"DDIM steps must be in [1, {self.T}], got {steps}")
        return sorted({round(i * (self.T - 1) / max(steps - 1, 1)) for i in range(steps)}, reverse=True)

    @torch.no_grad()
    def ddim_sample(
        self,
        model: Denoiser,
        shape: Sequence[int],
        *,
        steps: int = 50,
        seed: int = 0,
        eta: float = 0.0,
        batch_size: int = 500,
        device: str | torch.device = "cpu",
        clip: bool = True,
    ) -> Tensor:
        """DDIM samples of ``shape`` (``N`` first), in [-1, 1] when ``clip``; deterministic by ``seed`` at eta=0.

        The initial noise for all ``N`` samples is drawn first from a generator seeded with ``seed``,
        so the result does not depend on ``batch_size``. ``clip`` clamps each predicted x_0 to
        [-1, 1] and re-derives ε from it (the usual DDIM sampler for images in that range).
        """
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(tuple(shape), generator=gen)
        a_all = self.alphas_cumprod.to(device)
        ts = self.timesteps(steps)
        out = []
        for start in range(0, noise.shape[0], batch_size):
            x = noise[start:start + batch_size].to(device)
            for i, t in enumerate(ts):
                a_t = a_all[t]
                a_prev = a_all[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=device)
                eps = model(x, torch.full((x.shape[0],), t, device=device, dtype=torch.long))
                x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                if clip:
                    x0 = x0.clamp(-1.0, 1.0)
                    eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
                sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
                x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
                if eta > 0 and i + 1 < len(ts):
                    x = x + sigma * torch.randn(x.shape, generator=gen).to(device)
            out.append(x.clamp(-1.0, 1.0) if clip else x)
        return torch.cat(out)


class EMA:
    """Exponential moving average of a module's parameters (buffers copied), with warm-up.

    >>> net = nn.Linear(1, 1, bias=False)
    >>> _ = nn.init.zeros_(net.weight)
    >>> ema = EMA(net, decay=0.5)
    >>> _ = nn.init.ones_(net.weight)
    >>> ema.update(net)  # n=1: decay min(0.5, 2/11) = 2/11, so the average moves 9/11 of the way
    >>> round(float(ema.module.weight), 4)
    0.8182
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for mine, theirs in zip(self.module.parameters(), model.parameters()):
            mine.lerp_(theirs.detach(), 1.0 - d)
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        self.module.load_state_dict(state["module"])


def pad_to_unit_range(images: Tensor, size: int = 32) -> Tensor:
    """uint8 ``(N, C, H, W)`` images → float in [-1, 1], zero-padded (black, -1) to ``size``×``size``.

    >>> pad_to_unit_range(torch.full((1, 1, 28, 28), 255, dtype=torch.uint8)).shape
    torch.Size([1, 1, 32, 32])
    """
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"images of {h}x{w} do not fit a {size}x{size} canvas")
    top, left = (size - h) // 2, (size - w) // 2
    x = F.pad(images.float(), (left, size - w - left, top, size - h - top))
    return x / 127.5 - 1.0


@dataclass
class DiffusionObjective:
    """Per-batch loss of a student (or teacher) denoiser for one of ``METHODS`` (module docstring).

    >>> obj = DiffusionObjective("output")
    >>> e = torch.ones(2, 1, 4, 4)
    >>> {k: float(v) for k, v in obj(e, e, teacher_eps=e).items()}
    {'denoise': 0.0, 'output': 0.0, 'total': 0.0}
    """

    method: str = "none"
    red_loss: str = "cosine"
    task_weight: float | None = None  # default 1.0 for none and red-blocks, 0.5 otherwise
    distill_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown diffusion distillation method '{self.method}' (use {', '.join(METHODS)})")
        if self.red_loss not in RED_LOSSES:
            raise ValueError(f"unknown RED loss '{self.red_loss}' (use {', '.join(RED_LOSSES)})")
        if self.task_weight is None:
            self.task_weight = 1.0 if self.method in ("none", "red-blocks") else 0.5

    @property
    def needs_teacher(self) -> bool:
        return self.method in ("output", "red")

    def site_loss(self, s: Tensor, t: Tensor) -> Tensor:
        """RED loss of one site: channel-mean maps compared by cosine or MSE."""
        if self.red_loss == "cosine":
            return red_loss(s, t)
        return F.mse_loss(s.mean(1), t.mean(1).to(s.dtype))

    def __call__(
        self,
        eps_pred: Tensor,
        noise: Tensor,
        *,
        teacher_eps: Tensor | None = None,
        student_feats: Sequence[Tensor] = (),
        teacher_feats: Sequence[Tensor] = (),
    ) -> dict[str, Tensor]:
        """``{"denoise", <method term>, "total"}`` (unweighted terms, weighted total)."""
        terms = {"denoise": F.mse_loss(eps_pred, noise)}
        if self.method == "output":
            if teacher_eps is None:
                raise ValueError("method 'output' needs the teacher's ε")
            terms["output"] = F.mse_loss(eps_pred, teacher_eps)
        elif self.method == "red":
            if not student_feats or len(student_feats) != len(teacher_feats):
                raise ValueError(f"method 'red' needs matched features, got {len(student_feats)} student and "
                                 f"{len(teacher_feats)} teacher maps")
            terms["red"] = torch.stack([self.site_loss(s, t) for s, t in zip(student_feats, teacher_feats)]).mean()
        distill = sum((v for k, v in terms.items() if k != "denoise"), torch.zeros(()))
        assert self.task_weight is not None
        terms["total"] = self.task_weight * terms["denoise"] + (self.distill_weight * distill if len(terms) > 1 else 0)
        return terms


@dataclass
class TrainOutcome:
    """What :func:`train_denoiser` returns: the EMA model, timing and the loss curve."""

    ema: nn.Module
    model: nn.Module
    steps: int
    seconds_per_step: float
    losses: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0


def _checkpoint_path(run_dir: str | Path | None) -> Path | None:
    return None if run_dir is None else Path(run_dir) / "last.pt"


def train_denoiser(
    model: nn.Module,
    images: Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 5e-4,
    warmup: int = 100,
    ema_decay: float = 0.999,
    schedule: NoiseSchedule | None = None,
    objective: DiffusionObjective | None = None,
    teacher: nn.Module | None = None,
    student_taps: Sequence[str] = (),
    teacher_taps: Sequence[str] = (),
    seed: int = 0,
    run_dir: str | Path | None = None,
    checkpoint_every: int = 200,
    log_every: int = 100,
    log: Callable[[str], None] | None = None,
) -> TrainOutcome:
    """Train ``model`` (called as ``model(x_t, t)``) to predict the noise of ``images`` (in [-1, 1]).

    Adam, linear warm-up over ``warmup`` steps then constant ``lr``, grad-norm clip 1.0, EMA of the
    weights. ``teacher`` (frozen, eval) is needed by ``output`` and ``red``; ``red`` taps the
    student's nodes ``student_taps`` (the RED block outputs) and the teacher's ``teacher_taps``
    (fx node or module names, in matched order). With ``run_dir`` a checkpoint is written every
    ``checkpoint_every`` steps and at the end, and a rerun continues from it.

    >>> import torch
    >>> net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1))
    >>> denoiser = lambda x, t: net(x)
    >>> class Wrap(nn.Module):
    ...     def __init__(self): super().__init__(); self.net = net
    ...     def forward(self, x, t): return self.net(x)
    >>> out = train_denoiser(Wrap(), torch.zeros(8, 1, 4, 4), steps=3, batch_size=4)
    >>> out.steps, len(out.losses)
    (3, 3)
    """
    schedule = schedule or NoiseSchedule()
    objective = objective or DiffusionObjective()
    if objective.needs_teacher and teacher is None:
        raise ValueError(f"method '{objective.method}' needs a teacher")
    if objective.method == "red" and (not student_taps or len(student_taps) != len(teacher_taps)):
        raise ValueError(f"method 'red' needs matched taps, got {list(student_taps)} / {list(teacher_taps)}")
    step_model: nn.Module = FeatureTap(student_taps).prepare(model) if objective.method == "red" else model
    teacher_model = None
    unique_taps = list(dict.fromkeys(teacher_taps))  # several sites may learn from one teacher map
    tap_index = [unique_taps.index(name) for name in teacher_taps]
    if teacher is not None and objective.needs_teacher:
        teacher = teacher.eval().requires_grad_(False)
        teacher_model = FeatureTap(unique_taps).prepare(teacher) if objective.method == "red" else teacher
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ema = EMA(model, ema_decay)
    gen = torch.Generator().manual_seed(seed)
    losses: list[dict[str, float]] = []
    start, elapsed = 0, 0.0
    ckpt = _checkpoint_path(run_dir)
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        ema.load_state_dict(state["ema"])
        gen.set_state(state["gen"])
        start, elapsed, losses = state["step"], state["elapsed"], state["losses"]
    resumed_from = start
    a_all = schedule.alphas_cumprod

    def save(step: int) -> None:
        if ckpt is None:
            return
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(),
                    "gen": gen.get_state(), "step": step, "elapsed": elapsed, "losses": losses}, tmp)
        tmp.replace(ckpt)

    model.train()
    for step in range(start, steps):
        t0 = time.perf_counter()
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        x0 = images[idx]
        t = torch.randint(0, schedule.T, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = a_all[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        teacher_eps, teacher_feats = None, []
        if teacher_model is not None:
            with torch.no_grad():
                out = teacher_model(xt, t)
            teacher_eps, teacher_feats = (out[0], [out[1][i] for i in tap_index]) if objective.method == "red" else (out, [])
        out = step_model(xt, t)
        eps, feats = (out[0], list(out[1])) if objective.method == "red" else (out, [])
        terms = objective(eps, noise, teacher_eps=teacher_eps, student_feats=feats, teacher_feats=teacher_feats)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / max(warmup, 1))
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        elapsed += time.perf_counter() - t0
        losses.append({k: round(float(v.detach()), 6) for k, v in terms.items()})
        if log is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
            recent = losses[-log_every:]
            mean = {k: sum(r[k] for r in recent) / len(recent) for k in recent[-1]}
            log(f"step {step + 1}/{steps} " + " ".join(f"{k} {v:.4f}" for k, v in mean.items())
                + f" ({elapsed / (step + 1):.3f} s/step)")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save(step + 1)
    save(steps)
    model.eval()
    return TrainOutcome(ema=ema.module, model=model, steps=steps, seconds_per_step=elapsed / max(steps, 1),
                        losses=losses, resumed_from=resumed_from)
