"""Train a teacher (``method=none``) or distil a student, on one process or under ``torchrun``.

Usage::

    python -m distill.trainer CONFIG.yaml key=value ...
    python -m distill.trainer resume=RUN_DIR                  # continue a run where last.pt stopped
    torchrun --nproc_per_node=2 -m distill.trainer CONFIG.yaml

A run directory (``out_dir``) holds the resolved ``config.yaml``; ``metrics.jsonl`` with one JSON
object per epoch (``epoch``, ``train_loss`` {``total``, ``task``, one key per method term},
``train_acc``, ``val_acc``, ``test_acc`` in percent, ``lr`` at the epoch's end, ``seconds``,
``images_per_s``); ``last.pt`` (model, objective, optimizer, scheduler, scaler, epoch, best, RNG
states; written atomically); ``best.pt`` (best on validation, with its test accuracy); and
``student.pt`` (final state_dict). Every ``.pt`` loads with ``torch.load(..., weights_only=True)``.
Data order, augmentation and the global RNG are drawn from generators seeded by
``(seed, epoch, rank)``, so a resumed run reproduces an uninterrupted one.

**Derived students.** With ``factor`` (or ``recipe``) the student is the teacher architecture
rewritten by :func:`passes.aggressive_pool` (or :func:`passes.apply_recipe`), freshly initialised;
methods that need RED blocks get them from :func:`passes.attach_red` at ``placement``, and feature
methods tap the stage map (RED block outputs, or the shrunk stage outputs for FitNet/AT) against
the teacher maps of equal size, so ``method`` plus ``factor`` is all a run needs. The run directory
then also holds ``recipe.json`` (the recipe plus ``red_placement``, null without RED blocks), from
which :func:`load_student` rebuilds the trained student. Teacher-run config files record
``model_kwargs``/``teacher_kwargs`` with ``num_classes``/``in_chans`` filled in from the data.

>>> cfg = TrainConfig(model="torch.nn:Identity")
>>> cfg.method, cfg.schedule, cfg.task_weight
('none', 'onecycle', None)
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import math
import operator
import os
import random
import sys
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, MultiStepLR, OneCycleLR
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from distill.data import DataBundle, ImageDataset, Preprocess, load_data
from distill.features import FeatureFn, FeatureTap, LogitsOnly
from distill.losses import LossInputs, Objective, build_objective
from distill.red import REDBlock
from passes import (
    ABSORB,
    PLACEMENTS,
    POOLS,
    PassError,
    Recipe,
    Student,
    aggressive_pool,
    apply_recipe,
    attach_red,
)

__all__ = [
    "SCHEDULES",
    "ConfigError",
    "TrainConfig",
    "TrainResult",
    "config_from_dict",
    "load_config",
    "load_student",
    "main",
    "register_schedule",
    "state_digest",
    "train",
]

log = logging.getLogger("distill.trainer")

ModelFactory = Callable[..., nn.Module]


class ConfigError(ValueError):
    """Invalid training configuration (unknown key, wrong type, inconsistent settings)."""


@dataclass
class TrainConfig:
    """Everything a run needs; YAML keys and ``key=value`` overrides use these field names.

    ``model``/``teacher``: a factory, ``"zoo:NAME"`` (:mod:`memplan.zoo`) or
    ``"package.module:attr"`` / ``"path/file.py:attr"``; a factory parameter named ``num_classes``
    or ``in_chans`` not set in ``*_kwargs`` is filled from the data. ``factor`` or ``recipe`` (a
    ``recipe.json``) derives the student from ``teacher`` instead of ``model`` (module docstring),
    with ``pool``/``absorb`` as in :func:`passes.aggressive_pool` and RED ``placement``
    ``"input+output"`` or ``"output"``. ``teacher_checkpoint``: a state_dict file, a
    ``best.pt``/``last.pt``, or a run directory (its ``student.pt``). Taps name fx nodes or modules
    (``FeatureTap``; a teacher name may repeat); without taps, a derived student taps its stage
    map, and a given student with a RED method its ``REDBlock`` modules in module order.
    ``batch_size`` is per process. ``task_weight`` None: 1.0 without distillation terms, else 0.5.
    ``alpha`` weights the ``red`` term; other method options go in ``method_options``
    (``{kd: {temperature: 4}}``). ``milestones``/``gamma`` apply to ``schedule: step``
    (default milestones: 50% and 75% of the epochs). ``out_dir`` None: nothing is written.
    """

    model: str | ModelFactory = ""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    image_size: int | None = None
    val_fraction: float = 0.1
    train_subset: int | None = None
    method: str = "none"
    teacher: str | ModelFactory | None = None
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    teacher_checkpoint: str | None = None
    factor: int | None = None
    recipe: str | None = None
    pool: str = "stride"
    absorb: str = "stem"
    placement: str = "input+output"
    student_taps: list[str] = field(default_factory=list)
    teacher_taps: list[str] = field(default_factory=list)
    alpha: float = 1.0
    task_weight: float | None = None
    distill_weight: float = 0.5
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    schedule: str = "onecycle"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    seed: int = 0
    out_dir: str | None = None
    resume: str | None = None
    num_workers: int = 0
    device: str = "auto"
    amp: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain-YAML form; factories become ``"module:qualname"`` strings."""
        out = dataclasses.asdict(self)
        for key in ("model", "teacher"):
            if callable(out[key]):
                out[key] = f"{out[key].__module__}:{out[key].__qualname__}"
        return out


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


# ---------------------------------------------------------------------------------------------
# configuration

_NULLS = {"null", "none", "~", ""}
_RESUME_MUTABLE = {"resume", "out_dir", "num_workers", "device"}


def _fields() -> dict[str, Any]:
    return get_type_hints(TrainConfig, globalns=globals())


def _admits_str(hint: Any) -> bool:
    return hint is str or (_is_union(hint) and str in get_args(hint))


def _is_union(hint: Any) -> bool:
    return get_origin(hint) in (Union, types.UnionType)


def _convert(key: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against type ``hint`` (int -> float and numeric strings -> float allowed)."""
    origin, args = get_origin(hint), get_args(hint)
    if _is_union(hint):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _convert(key, arg, value)
                except ConfigError:
                    pass
    elif hint is Any:
        return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_convert(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return {_convert(key, args[0], k): _convert(f"{key}.{k}", args[1], v) for k, v in value.items()}
    elif origin is Callable:
        if callable(value):
            return value
    raise ConfigError(f"config key {key!r}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Validate keys and value types of a mapping and build a ``TrainConfig``.

    >>> config_from_dict({"model": "torch.nn:Identity", "lr": "1e-3"}).lr
    0.001
    """
    hints = _fields()
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {', '.join(hints)}")
    return TrainConfig(**{key: _convert(key, hints[key], value) for key, value in data.items()})


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    hints = _fields()
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        if key not in hints:
            raise ConfigError(
                f"unknown config key {key!r} in override {item!r}; valid keys: {', '.join(hints)}"
            )
        if text.strip().lower() in _NULLS and type(None) in get_args(hints[key]):
            parsed[key] = None
        elif _admits_str(hints[key]):
            parsed[key] = text
        else:
            try:
                parsed[key] = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"override {item!r}: cannot parse value ({exc})") from None
    return parsed


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, found {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a YAML config (``yaml.safe_load``) and apply ``key=value`` overrides with type coercion.

    Without ``path``, ``resume=RUN_DIR`` takes the run's saved ``config.yaml`` as the base.

    >>> load_config(None, ["model=torch.nn:Identity", "epochs=3", "train_subset=null"]).epochs
    3
    """
    parsed = _parse_overrides(overrides)
    if path is not None:
        base = _read_yaml(Path(path))
    elif parsed.get("resume"):
        base = _read_yaml(Path(parsed["resume"]) / "config.yaml")
    else:
        base = {}
    return config_from_dict({**base, **parsed})


def _check_config(cfg: TrainConfig) -> TrainConfig:
    """Re-validate types (programmatic configs) and ranges; resolve ``out_dir`` for resume."""
    cfg = config_from_dict({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    problems = []
    derived = cfg.factor is not None or cfg.recipe is not None
    if derived:
        if cfg.factor is not None and cfg.recipe is not None:
            problems.append("give factor or recipe, not both")
        if cfg.model:
            problems.append("with factor/recipe the student is derived from teacher; leave model unset")
        if cfg.teacher is None:
            problems.append("factor/recipe need teacher (the architecture the student is derived from)")
        if cfg.factor is not None and cfg.factor < 1:
            problems.append("factor must be >= 1")
    elif not cfg.model:
        problems.append("model is required (or factor/recipe with a teacher)")
    for key, allowed in (("pool", POOLS), ("absorb", ABSORB), ("placement", PLACEMENTS)):
        if getattr(cfg, key) not in allowed:
            problems.append(f"{key} must be one of {list(allowed)}")
    for key in ("epochs", "batch_size"):
        if getattr(cfg, key) < 1:
            problems.append(f"{key} must be >= 1")
    if cfg.lr <= 0:
        problems.append("lr must be > 0")
    if cfg.seed < 0:
        problems.append("seed must be >= 0")
    if cfg.num_workers < 0:
        problems.append("num_workers must be >= 0")
    if cfg.schedule not in SCHEDULES:
        problems.append(f"schedule must be one of {sorted(SCHEDULES)}")
    if "alpha" in cfg.method_options.get("red", {}):
        problems.append("set the red weight with alpha, not method_options.red.alpha")
    if cfg.resume and cfg.out_dir and Path(cfg.out_dir).resolve() != Path(cfg.resume).resolve():
        problems.append("resume continues in its own run directory; leave out_dir unset or equal to resume")
    if problems:
        raise ConfigError("; ".join(problems))
    if cfg.resume:
        cfg.out_dir = cfg.resume
    return cfg


def resolve_factory(spec: str | ModelFactory) -> ModelFactory:
    """A model factory from a callable, ``"zoo:NAME"``, ``"package.module:attr"`` or ``"file.py:attr"``.

    >>> resolve_factory("torch.nn:Identity")
    <class 'torch.nn.modules.linear.Identity'>
    >>> resolve_factory("zoo:resnet_tiny")(num_classes=3, in_chans=1).fc.out_features
    3
    """
    if callable(spec):
        return spec
    if spec.startswith("zoo:"):
        return _zoo_factory(spec[4:])
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"model spec {spec!r} must look like 'package.module:factory' or 'file.py:factory'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            name = f"_distill_models_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
            module = sys.modules.get(name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(name, path)
                if loader_spec is None or loader_spec.loader is None:
                    raise ImportError(f"cannot load {path}")
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[name] = module
                loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        factory = operator.attrgetter(attr)(module)
    except (ImportError, AttributeError, OSError) as exc:
        raise ConfigError(f"cannot resolve model spec {spec!r}: {exc}") from None
    if not callable(factory):
        raise ConfigError(f"model spec {spec!r} is not callable")
    return factory


def _zoo_factory(name: str) -> ModelFactory:
    """``memplan.zoo.create_model(name, ...)`` with ``num_classes``/``in_chans`` in its signature."""
    from memplan import zoo

    if name not in zoo.list_models():
        raise ConfigError(f"unknown zoo model {name!r}; known: {', '.join(zoo.list_models())}")

    def build(*, num_classes: int, in_chans: int, **kwargs: Any) -> nn.Module:
        return zoo.create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)

    return build


def _filled_kwargs(spec: str | ModelFactory, kwargs: Mapping[str, Any], bundle: DataBundle) -> dict[str, Any]:
    """``kwargs`` plus the factory's ``num_classes``/``in_chans`` parameters, taken from the data."""
    kwargs = dict(kwargs)
    try:
        params = inspect.signature(resolve_factory(spec)).parameters
    except (TypeError, ValueError):
        params = {}
    for key, value in (("num_classes", bundle.num_classes), ("in_chans", bundle.in_chans)):
        if key in params and key not in kwargs:
            kwargs[key] = value
    return kwargs


def _build_model(spec: str | ModelFactory, kwargs: Mapping[str, Any]) -> nn.Module:
    try:
        model = resolve_factory(spec)(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build model {spec!r} with {dict(kwargs)}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _load_weights(model: nn.Module, path: str, what: str = "teacher") -> None:
    file = Path(path) / "student.pt" if Path(path).is_dir() else Path(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        model.load_state_dict(state)
    except (OSError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{file}: cannot load {what} weights ({first})") from None


# ---------------------------------------------------------------------------------------------
# schedules

ScheduleFactory = Callable[[torch.optim.Optimizer, TrainConfig, int], LRScheduler]
SCHEDULES: dict[str, ScheduleFactory] = {}


def register_schedule(name: str) -> Callable[[ScheduleFactory], ScheduleFactory]:
    """Register ``factory(optimizer, config, steps_per_epoch)``; schedulers step every batch."""

    def add(factory: ScheduleFactory) -> ScheduleFactory:
        SCHEDULES[name] = factory
        return factory

    return add


@register_schedule("onecycle")
def _onecycle(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> LRScheduler:
    return OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps, cycle_momentum=False)


@register_schedule("cosine")
def _cosine(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> LRScheduler:
    return CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps)


@register_schedule("step")
def _step(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> LRScheduler:
    milestones = cfg.milestones or [cfg.epochs // 2, (3 * cfg.epochs) // 4]
    return MultiStepLR(optimizer, milestones=[m * steps for m in milestones], gamma=cfg.gamma)


# ---------------------------------------------------------------------------------------------
# distributed helpers, RNG, checkpoints


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    active: bool = False
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup(device_pref: str) -> tuple[_Dist, torch.device]:
    """Resolve the device and, under torchrun (RANK/WORLD_SIZE set), join the process group."""
    env = os.environ
    launched = "RANK" in env and "WORLD_SIZE" in env
    local_rank = int(env.get("LOCAL_RANK", "0")) if launched else 0
    if device_pref == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    elif device_pref == "cuda":
        device = torch.device(f"cuda:{local_rank}")
    else:
        try:
            device = torch.device(device_pref)
        except RuntimeError as exc:
            raise ConfigError(f"bad device {device_pref!r}: {exc}") from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not launched:
        return _Dist(), device
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(int(env["RANK"]), int(env["WORLD_SIZE"]), True, owns), device


def _derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def _rng_state() -> dict[str, Any]:
    """Global RNG states in forms ``torch.load(weights_only=True)`` accepts."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_digest(state_dict: Mapping[str, Tensor]) -> str:
    """SHA-256 over the names and raw bytes of a state_dict (equal weights <=> equal digest).

    >>> state_digest({"w": torch.zeros(2)}) == state_digest({"w": torch.zeros(2)})
    True
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(state_dict[name].shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _RunFiles:
    """The run directory; every method is a no-op on non-main ranks or without ``out_dir``."""

    def __init__(self, out_dir: str | None, enabled: bool) -> None:
        self.dir = Path(out_dir) if out_dir else None
        self.enabled = enabled and self.dir is not None

    def start(self, config: dict[str, Any], resume: bool) -> None:
        if self.dir is None:
            return
        saved = self.dir / "config.yaml"
        if resume:
            if not (self.dir / "last.pt").exists():
                raise ConfigError(f"{self.dir / 'last.pt'}: nothing to resume")
            if saved.exists():
                old = _read_yaml(saved)
                changed = sorted(k for k in config if k not in _RESUME_MUTABLE and old.get(k) != config[k])
                if changed:
                    raise ConfigError(f"resume: config differs from {saved} in {changed}")
        elif (self.dir / "last.pt").exists():
            raise ConfigError(f"{self.dir} already holds a run; pass resume={self.dir} or pick a new out_dir")
        if self.enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = saved.with_name(".config.yaml.tmp")
            tmp.write_text(yaml.safe_dump(config, sort_keys=False))
            os.replace(tmp, saved)

    def history(self, upto: int) -> list[dict[str, Any]]:
        """Metrics of epochs <= ``upto``; the main rank also drops later lines from the file."""
        path = self.dir / "metrics.jsonl" if self.dir else None
        if path is None or not path.exists():
            return []
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [r for r in records if r["epoch"] <= upto]
        if self.enabled and len(kept) != len(records):
            tmp = path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, path)
        return kept

    def append_metrics(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, name: str, obj: Any) -> None:
        if self.enabled:
            _atomic_save(obj, self.dir / name)

    def write_text(self, name: str, text: str) -> None:
        if self.enabled:
            tmp = self.dir / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.dir / name)

    def save_last(self, checkpoint: dict[str, Any]) -> None:
        self.save("last.pt", checkpoint)


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# training


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
    model: nn.Module
    features: FeatureFn

    @torch.no_grad()
    def __call__(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self.features(self.model, x)


class _MatchedTap:
    """A ``FeatureTap`` whose names may repeat (several student points matched to one teacher map)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.tap = FeatureTap(list(dict.fromkeys(names)))
        self.index = [self.tap.names.index(name) for name in names]

    def prepare(self, model: nn.Module) -> nn.Module:
        try:
            return self.tap.prepare(model)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def __call__(self, model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        logits, feats = self.tap(model, x)
        return logits, [feats[i] for i in self.index]


def _feature_fns(
    cfg: TrainConfig, objective: Objective, student: nn.Module, derived: Student | None
) -> tuple[FeatureFn, FeatureFn]:
    """Student and teacher feature functions: explicit taps, else the derived student's stage map."""
    if not objective.needs_features:
        return LogitsOnly(), LogitsOnly()
    if derived is None:
        reds = [name for name, m in student.named_modules() if isinstance(m, REDBlock)]
        default_student, default_teacher = reds if objective.needs_red_blocks else [], []
    elif objective.needs_red_blocks:
        default_student, default_teacher = list(student.red_points), list(student.red_teachers)
    else:
        pairs = derived.stage_map.outputs
        default_student, default_teacher = [p.student for p in pairs], [p.teacher for p in pairs]
    student_taps = list(cfg.student_taps) or default_student
    teacher_taps = list(cfg.teacher_taps) or default_teacher
    if not student_taps or not teacher_taps:
        raise ConfigError(
            f"method {cfg.method!r} needs student_taps (or RED blocks) and teacher_taps, or a student derived "
            "with factor/recipe whose stage map matches teacher maps"
        )
    return _MatchedTap(tuple(student_taps)), _MatchedTap(tuple(teacher_taps))


def _derive_student(cfg: TrainConfig, bundle: DataBundle, red: bool) -> tuple[Student, nn.Module]:
    """The aggressive-pool student of ``cfg.teacher`` (fresh weights) and the module to train.

    The module is the student's ``GraphModule``, with RED blocks at ``cfg.placement`` when ``red``.
    """
    arch = _build_model(cfg.teacher, cfg.teacher_kwargs)
    x = torch.empty(1, bundle.in_chans, *bundle.input_size, device="meta")
    try:
        if cfg.recipe is not None:
            student = apply_recipe(arch, Recipe.load(cfg.recipe), x)
        else:
            student = aggressive_pool(arch, x, factor=cfg.factor, pool=cfg.pool, absorb=cfg.absorb)
        module = attach_red(student.module, student.stage_map, cfg.placement) if red else student.module
    except PassError as exc:
        raise ConfigError(f"cannot derive the student of {cfg.teacher!r}: {exc}") from exc
    return student, module


def _recipe_json(recipe: Recipe, placement: str | None) -> str:
    return json.dumps({**recipe.to_json(), "red_placement": placement}, indent=2) + "\n"


def load_student(run_dir: str | Path, weights: str = "student.pt") -> nn.Module:
    """Rebuild the model a run directory trained, with its weights, in eval mode.

    A derived student (``factor``/``recipe``): the teacher architecture from ``config.yaml``, the
    recipe from ``recipe.json`` re-applied, RED blocks attached at its ``red_placement``; otherwise
    ``model`` with ``model_kwargs``. ``weights``: ``student.pt`` (final), ``best.pt`` or ``last.pt``,
    loaded with ``torch.load(weights_only=True)``.

    >>> import tempfile
    >>> run = Path(tempfile.mkdtemp()) / "run"
    >>> cfg = TrainConfig(teacher="zoo:resnet_tiny", factor=4, method="red-blocks", placement="output",
    ...                   data="digits", image_size=16, train_subset=100, epochs=1, batch_size=50,
    ...                   out_dir=str(run), device="cpu")
    >>> r = train(cfg)
    >>> model = load_student(run)
    >>> model.red_points, bool((model(torch.zeros(1, 1, 16, 16)) == r.student.eval()(torch.zeros(1, 1, 16, 16))).all())
    (['red_out0', 'red_out1', 'red_out2'], True)
    """
    run = Path(run_dir)
    cfg = config_from_dict(_read_yaml(run / "config.yaml"))
    if cfg.factor is None and cfg.recipe is None:
        model = _build_model(cfg.model, cfg.model_kwargs)
    else:
        try:
            doc = json.loads((run / "recipe.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{run / 'recipe.json'}: cannot read the student recipe ({exc})") from None
        try:
            student = apply_recipe(_build_model(cfg.teacher, cfg.teacher_kwargs), Recipe.from_json(doc))
            placement = doc.get("red_placement")
            model = attach_red(student.module, student.stage_map, placement) if placement else student.module
        except PassError as exc:
            raise ConfigError(f"{run}: cannot rebuild the student: {exc}") from exc
    _load_weights(model, str(run / weights), "student")
    return model.eval()


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
    env: _Dist,
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


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.model`` with ``config.method``; see the module docstring for run files.

    >>> net = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    >>> r = train(TrainConfig(model=net, data="digits", epochs=1, batch_size=64, lr=0.05))
    >>> r.epochs, len(r.history), r.last_test_acc > 50
    (1, 1, True)
    """
    cfg = _check_config(config)
    env, device = _setup(cfg.device)
    try:
        return _Session(cfg, env, device).run()
    finally:
        if env.owns_group:
            dist.destroy_process_group()


class _Session:
    """One training run: built from the config, then resumed (optionally) and run epoch by epoch."""

    def __init__(self, cfg: TrainConfig, env: _Dist, device: torch.device) -> None:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.env, self.device = env, device
        try:
            self.bundle = load_data(
                cfg.data,
                val_fraction=cfg.val_fraction,
                train_subset=cfg.train_subset,
                seed=cfg.seed,
                image_size=cfg.image_size,
            )
        except ValueError as exc:  # DataError included
            raise ConfigError(f"data {cfg.data!r}: {exc}") from exc
        self.preprocess = self.bundle.preprocess
        options = {**cfg.method_options, "red": {**cfg.method_options.get("red", {}), "alpha": cfg.alpha}}
        try:
            self.objective = build_objective(
                cfg.method, task_weight=cfg.task_weight, distill_weight=cfg.distill_weight, options=options
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.cfg = cfg = dataclasses.replace(
            cfg,
            task_weight=self.objective.task_weight,
            model_kwargs=_filled_kwargs(cfg.model, cfg.model_kwargs, self.bundle)
            if cfg.model
            else cfg.model_kwargs,
            teacher_kwargs=_filled_kwargs(cfg.teacher, cfg.teacher_kwargs, self.bundle)
            if cfg.teacher
            else cfg.teacher_kwargs,
        )

        # graph rewrites (student derivation, RED blocks, feature taps) happen here, before any DDP wrapping
        self.derived: Student | None = None
        if cfg.factor is not None or cfg.recipe is not None:
            self.derived, self.student = _derive_student(cfg, self.bundle, self.objective.needs_red_blocks)
        else:
            self.student = _build_model(cfg.model, cfg.model_kwargs)
        if self.objective.needs_red_blocks and not any(
            isinstance(m, REDBlock) for m in self.student.modules()
        ):
            raise ConfigError(f"method {cfg.method!r} needs a student with REDBlock modules attached")
        student_fn, teacher_fn = _feature_fns(cfg, self.objective, self.student, self.derived)
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
        self.files = _RunFiles(cfg.out_dir, env.main)
        self.start_epoch = 0
        self.best: dict[str, Any] = {"epoch": 0, "val_acc": -math.inf, "test_acc": math.nan}

    def _build_teacher(self, features: FeatureFn) -> _Teacher:
        cfg = self.cfg
        if cfg.teacher is None or cfg.teacher_checkpoint is None:
            raise ConfigError(f"method {cfg.method!r} needs teacher and teacher_checkpoint")
        model = _build_model(cfg.teacher, cfg.teacher_kwargs)
        _load_weights(model, cfg.teacher_checkpoint)
        model.eval().requires_grad_(False)
        return _Teacher(features.prepare(model).to(self.device).eval(), features)

    def _setup_objective(self) -> None:
        """Run two training images through both models so the objective sees the feature shapes."""
        probe = self.preprocess(self.bundle.train.images[:2].to(self.device), train=False)
        self.step.eval()
        with torch.no_grad():
            _, student_feats = self.step.features(self.step.student, probe)
        self.step.train()
        self.objective.setup(student_feats, self.teacher(probe)[1] if self.teacher else [])
        self.objective.to(self.device)

    def _resume(self, run_dir: Path) -> None:
        ckpt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
        self.student.load_state_dict(ckpt["model"])
        self.objective.load_state_dict(ckpt["objective"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        self.start_epoch, self.best = ckpt["epoch"], ckpt["best"]

    def run(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        self.files.start(cfg.to_dict(), resume=bool(cfg.resume))
        if self.derived is not None:
            placement = cfg.placement if self.objective.needs_red_blocks else None
            self.files.write_text("recipe.json", _recipe_json(self.derived.recipe, placement))
        if cfg.resume:
            self._resume(Path(cfg.resume))
        history = self.files.history(self.start_epoch)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        model = DistributedDataParallel(self.step, device_ids=device_ids) if env.active else self.step
        for epoch in range(self.start_epoch, cfg.epochs):
            record = self._train_epoch(model, epoch)
            record["val_acc"] = _evaluate(self.step, self.bundle.val, self.preprocess, cfg, env, self.device)
            record["test_acc"] = _evaluate(
                self.step, self.bundle.test, self.preprocess, cfg, env, self.device
            )
            history.append(record)
            self.files.append_metrics(record)
            if env.main:
                log.info("epoch %d/%d %s", epoch + 1, cfg.epochs, json.dumps(record))
            self._checkpoint(epoch + 1, record)

        final_state = _cpu_state(self.student)
        self.files.save("student.pt", final_state)
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
        torch.manual_seed(_derive_seed(cfg.seed, epoch, env.rank))
        sampler = DistributedSampler(
            self.bundle.train,
            num_replicas=env.world,
            rank=env.rank,
            shuffle=True,
            seed=cfg.seed,
            drop_last=True,
        )
        sampler.set_epoch(epoch)
        loader_rng = torch.Generator().manual_seed(_derive_seed(cfg.seed, epoch, env.rank, 1))
        loader = _loader(self.bundle.train, cfg, device, loader_rng, sampler)
        augment_rng = torch.Generator().manual_seed(_derive_seed(cfg.seed, epoch, env.rank, 2))
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
            self.files.save("best.pt", {"model": _cpu_state(self.student), **self.best})
        self.files.save_last(
            {
                "epoch": epoch,
                "model": _cpu_state(self.student),
                "objective": _cpu_state(self.objective),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "best": self.best,
                "rng": _rng_state(),
            }
        )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m distill.trainer [CONFIG.yaml] key=value ...``; prints a JSON summary."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.split("\n\n>>>")[0])
        return 0 if args else 2
    paths = [a for a in args if "=" not in a]
    if len(paths) > 1:
        print(f"error: more than one config file: {paths}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    try:
        config = load_config(paths[0] if paths else None, [a for a in args if "=" in a])
        result = train(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        skip = {"student", "history", "run_dir"}
        summary = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name not in skip}
        print(json.dumps({"run_dir": str(result.run_dir) if result.run_dir else None, **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
