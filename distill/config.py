"""Training configuration: the :class:`TrainConfig` keys, YAML files and ``key=value`` overrides.

Configs are read with ``yaml.safe_load``; every key and value type is checked. Model specs read from a
file are vetted by :func:`check_specs`: only ``zoo:``, ``torchvision:`` and ``timm:`` names unless the
caller trusts code (``--trust-code``).

Example:
    >>> cfg = load_config(None, ["model=zoo:resnet_tiny", "lr=0.05", "train_subset=null"])
    >>> cfg.model, cfg.lr, cfg.method, cfg.schedule, cfg.task_weight
    ('zoo:resnet_tiny', 0.05, 'none', 'onecycle', None)
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml
from torch import nn

from distill.schedules import SCHEDULES
from memplan.errors import MemplanError
from memplan.specs import UntrustedCodeError, is_code_spec
from passes import ABSORB, PLACEMENTS, POOLS

__all__ = ["ConfigError", "TrainConfig", "check_config", "check_specs", "config_from_dict", "load_config", "read_yaml"]

ModelFactory = Callable[..., nn.Module]
SPEC_KEYS = ("model", "teacher")

class ConfigError(MemplanError, ValueError):
    """Invalid training configuration (unknown key, wrong type, inconsistent settings)."""


@dataclass
class TrainConfig:
    """Everything a run needs; YAML keys and ``key=value`` overrides use these field names.

    ``model``/``teacher``: a factory or a model spec (:mod:`memplan.specs`: ``zoo:``, ``torchvision:``,
    ``timm:``, ``package.module:attr``, ``path/file.py:attr``); a factory parameter named ``num_classes``
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
    task: str = "classify"
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


def read_yaml(path: Path) -> dict[str, Any]:
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


def check_specs(data: Mapping[str, Any], *, trust_code: bool, source: str) -> None:
    """Refuse model specs in ``data`` (read from ``source``) that name code, unless ``trust_code``.

    >>> check_specs({"model": "subprocess:run"}, trust_code=False, source="x.yaml")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    memplan.specs.UntrustedCodeError: x.yaml names the model factory 'subprocess:run' (model), ... --trust-code ...
    """
    if trust_code:
        return
    for key in SPEC_KEYS:
        value = data.get(key)
        if isinstance(value, str) and value and is_code_spec(value):
            raise UntrustedCodeError(
                f"{source} names the model factory '{value}' ({key}), code memplan would import and run; only "
                "zoo:, torchvision: and timm: names are accepted from files: pass --trust-code if you trust it")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), *, trust_code: bool = True
                ) -> TrainConfig:
    """Load a YAML config (``yaml.safe_load``) and apply ``key=value`` overrides with type coercion.

    Without ``path``, ``resume=RUN_DIR`` takes the run's saved ``config.yaml`` as the base. Model specs
    that come from a file (not from ``overrides``) pass :func:`check_specs` with ``trust_code``.

    >>> load_config(None, ["model=torch.nn:Identity", "epochs=3", "train_subset=null"]).epochs
    3
    """
    parsed = _parse_overrides(overrides)
    if path is not None:
        source = Path(path)
    elif parsed.get("resume"):
        source = Path(parsed["resume"]) / "config.yaml"
    else:
        source = None
    base = read_yaml(source) if source is not None else {}
    check_specs({k: v for k, v in base.items() if k not in parsed}, trust_code=trust_code, source=str(source))
    return config_from_dict({**base, **parsed})


def check_config(cfg: TrainConfig) -> TrainConfig:
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
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{f.name} must be a finite number, got {value}")
    if not cfg.lr > 0:
        problems.append("lr must be > 0")
    if not 0 <= cfg.val_fraction < 1:
        problems.append("val_fraction must be in [0, 1)")
    if cfg.seed < 0:
        problems.append("seed must be >= 0")
    if cfg.num_workers < 0:
        problems.append("num_workers must be >= 0")
    if cfg.schedule not in SCHEDULES:
        problems.append(f"schedule must be one of {SCHEDULES.names()}")
    if "alpha" in cfg.method_options.get("red", {}):
        problems.append("set the red weight with alpha, not method_options.red.alpha")
    if cfg.resume and cfg.out_dir and Path(cfg.out_dir).resolve() != Path(cfg.resume).resolve():
        problems.append("resume continues in its own run directory; leave out_dir unset or equal to resume")
    if problems:
        raise ConfigError("; ".join(problems))
    if cfg.resume:
        cfg.out_dir = cfg.resume
    return cfg
