"""Run directories: the one type that owns the layout of everything memplan trains or derives.

A run directory holds

- ``run.json``: ``{"format": "memplan-run/1", "kind": "train" | "distill" | "student", "input_shape": [...]}``;
- ``config.yaml``: the resolved :class:`~distill.config.TrainConfig` (model specs, data, settings);
- ``metrics.jsonl``: one JSON object per finished epoch;
- ``last.pt`` (resumable state), ``best.pt`` (best on validation), ``student.pt`` (final weights), all
  written atomically and read with ``torch.load(weights_only=True)``;
- ``recipe.json`` for a derived student: the :class:`passes.Recipe` plus ``red_placement``;
- ``.memplan.lock``: held (``flock``) by the one process writing the directory.

``memplan train`` and ``memplan distill`` write ``kind`` train/distill, ``memplan student --out``
writes a ``student`` directory (recipe, config naming the teacher, untrained ``student.pt``): every
command that takes a run accepts all three, and a ``memplan pipeline`` directory (its ``student/``). Model specs in ``config.yaml`` are limited to
``zoo:``/``torchvision:``/``timm:`` names unless the caller trusts code (``--trust-code``).

Example:
    >>> import tempfile, torch
    >>> from distill.config import TrainConfig
    >>> run = RunDir(tempfile.mkdtemp() + "/r")
    >>> with run.lock():
    ...     run.write_config(TrainConfig(model="zoo:resnet_tiny", model_kwargs={"num_classes": 10}).to_dict())
    ...     run.write_info("train", (1, 1, 28, 28))
    ...     run.save("student.pt", run.load_model(trust_code=False).state_dict())
    >>> run.kind, run.input_shape(), type(run.load_model()).__name__
    ('train', (1, 1, 28, 28), 'ResNet')
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.config import ConfigError, TrainConfig, check_specs, config_from_dict, read_yaml
from distill.red import attach_red
from memplan.errors import MemplanError
from memplan.io import atomic_write, check_destination, load_torch, save_torch, write_text_atomic
from memplan.specs import build_model
from passes import PassError, Recipe, apply_recipe

__all__ = ["RunDir", "RunError", "RunLockedError", "load_weights", "state_digest"]

FORMAT = "memplan-run/1"
KINDS = ("train", "distill", "student")
WEIGHTS = ("student.pt", "best.pt", "last.pt")


class RunError(MemplanError):
    """A path that is not a usable run directory, or a run file that cannot be read."""


class RunLockedError(RunError):
    """Another process is writing the run directory."""


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


class RunDir:
    """A run directory (module docstring). Constructing one touches nothing on disk."""

    CONFIG, METRICS, RECIPE, INFO, LOCK = "config.yaml", "metrics.jsonl", "recipe.json", "run.json", ".memplan.lock"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"RunDir('{self.path}')"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -------------------------------------------------------------------------------- discovery
    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run directory; anything else is a one-line :class:`RunError`."""
        run = cls(path)
        if not run.path.exists():
            raise RunError(f"run directory '{path}' does not exist")
        if not run.path.is_dir():
            raise RunError(f"'{path}' is a file, not a run directory")
        if not (run.has(cls.CONFIG) or run.has(cls.RECIPE)):
            if (run.path / "report.json").is_file() and (run.path / "student").is_dir():
                return cls.open(run.path / "student")  # a memplan pipeline directory: its deployed student
            raise RunError(f"'{path}' is not a memplan run directory (no {cls.CONFIG} or {cls.RECIPE})")
        return run

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> tuple[RunDir, str]:
        """A ``--teacher``-style argument (a run directory, or a weights file in one): the run and weights name."""
        given = Path(path)
        if given.is_dir():
            run = cls.open(given)
            return run, run.weights_file()
        if not given.is_file():
            raise RunError(f"'{path}' does not exist (give a run directory or a checkpoint file in one)")
        return cls.open(given.parent), given.name

    def has(self, name: str) -> bool:
        """Whether the directory holds the regular file ``name``."""
        return (self.path / name).is_file()

    @property
    def kind(self) -> str:
        """``train``, ``distill`` or ``student`` (``run.json``; older runs: from their files)."""
        info = self.info()
        if info.get("kind") in KINDS:
            return info["kind"]
        return "distill" if self.has(self.RECIPE) else "train"

    def info(self) -> dict[str, Any]:
        """``run.json`` (empty for directories written before it existed)."""
        if not self.has(self.INFO):
            return {}
        try:
            doc = json.loads((self.path / self.INFO).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunError(f"{self.path / self.INFO}: unreadable ({type(e).__name__}: {e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise RunError(f"{self.path / self.INFO}: not a memplan run file (expected format {FORMAT})")
        return doc

    def weights_file(self) -> str:
        """The final weights if present, else the best, else the last checkpoint."""
        name = next((n for n in WEIGHTS if self.has(n)), None)
        if name is None:
            raise RunError(f"run directory '{self.path}' holds no weights ({', '.join(WEIGHTS)})")
        return name

    # -------------------------------------------------------------------------------- writing
    def prepare(self) -> None:
        """Create the directory (an existing non-directory at the path is refused)."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"cannot use '{self.path}' as a run directory: it exists and is not a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create run directory '{self.path}': {e.strerror or e}") from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[RunDir]:
        """Hold the directory's lock (created if needed); a second process gets :class:`RunLockedError`."""
        self.prepare()
        path = check_destination(self.path / self.LOCK)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise RunError(f"cannot lock run directory '{self.path}': {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                owner = (self.path / self.LOCK).read_text().strip() or "?"
                raise RunLockedError(f"run directory '{self.path}' is in use by another memplan process "
                                     f"(pid {owner}); wait for it or pick another --out") from None
            raise RunError(f"cannot lock run directory '{self.path}': {e.strerror or e}") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        try:
            yield self
        finally:
            self._lock_fd = None
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _require_lock(self) -> None:
        if self._lock_fd is None:
            raise RunError(f"internal: write to run directory '{self.path}' without holding its lock")

    def write_info(self, kind: str, input_shape: tuple[int, ...]) -> None:
        """Write ``run.json``."""
        self._require_lock()
        doc = {"format": FORMAT, "kind": kind, "input_shape": [int(d) for d in input_shape]}
        write_text_atomic(self.path / self.INFO, json.dumps(doc, indent=2) + "\n")

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Write ``config.yaml`` (``TrainConfig.to_dict()``)."""
        import yaml

        self._require_lock()
        write_text_atomic(self.path / self.CONFIG, yaml.safe_dump(dict(config), sort_keys=False))

    def write_recipe(self, recipe: Recipe, placement: str | None) -> None:
        """Write ``recipe.json``: the student recipe and where its RED blocks sit (None: no blocks)."""
        self._require_lock()
        write_text_atomic(self.path / self.RECIPE, json.dumps({**recipe.to_json(), "red_placement": placement},
                                                              indent=2) + "\n")

    def save(self, name: str, obj: Any) -> None:
        """``torch.save`` into the directory, atomically."""
        self._require_lock()
        save_torch(obj, self.path / name)

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one epoch's metrics (the lock keeps writers from interleaving)."""
        self._require_lock()
        path = check_destination(self.path / self.METRICS)
        with open(path, "a") as f:
            f.write(json.dumps(dict(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_history(self, upto: int) -> list[dict[str, Any]]:
        """Metrics of epochs <= ``upto``; later lines (an interrupted epoch's) are dropped from the file."""
        records = self.history()
        kept = [r for r in records if r.get("epoch", 0) <= upto]
        if len(kept) != len(records):
            self._require_lock()
            with atomic_write(self.path / self.METRICS, "w") as f:
                f.write("".join(json.dumps(r) + "\n" for r in kept))
        return kept

    # -------------------------------------------------------------------------------- reading
    def history(self) -> list[dict[str, Any]]:
        """Every record of ``metrics.jsonl`` (empty without one)."""
        if not self.has(self.METRICS):
            return []
        try:
            lines = (self.path / self.METRICS).read_text().splitlines()
            return [json.loads(line) for line in lines if line.strip()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunError(f"{self.path / self.METRICS}: unreadable ({type(e).__name__}: {e})") from None

    def config_dict(self, *, trust_code: bool = False) -> dict[str, Any]:
        """``config.yaml`` as read (safe YAML), its model specs checked against ``trust_code``."""
        if not self.has(self.CONFIG):
            raise RunError(f"run directory '{self.path}' has no {self.CONFIG}")
        data = read_yaml(self.path / self.CONFIG)
        check_specs(data, trust_code=trust_code, source=str(self.path / self.CONFIG))
        return data

    def config(self, *, trust_code: bool = False) -> TrainConfig:
        """``config.yaml`` as a :class:`TrainConfig`."""
        return config_from_dict(self.config_dict(trust_code=trust_code))

    def recipe(self) -> tuple[Recipe, str | None]:
        """The student recipe and its RED placement."""
        try:
            doc = json.loads((self.path / self.RECIPE).read_text())
        except FileNotFoundError:
            raise RunError(f"run directory '{self.path}' has no {self.RECIPE} (not a derived student)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunError(f"{self.path / self.RECIPE}: unreadable ({type(e).__name__}: {e})") from None
        try:
            return Recipe.from_json(doc), doc.get("red_placement")
        except PassError as e:
            raise RunError(f"{self.path / self.RECIPE}: {e}") from None

    def input_shape(self) -> tuple[int, ...]:
        """The model's deploy input shape (``run.json``, else the recipe's)."""
        shape = self.info().get("input_shape")
        if shape:
            return tuple(int(d) for d in shape)
        if self.has(self.RECIPE):
            return tuple(self.recipe()[0].input_shape)
        raise RunError(f"run directory '{self.path}' records no input shape (no {self.INFO} or {self.RECIPE})")

    def build_model(self, *, trust_code: bool = False) -> nn.Module:
        """The run's architecture, freshly initialised: the derived student (RED blocks at their placement)
        when the run holds a recipe, else the config's ``model``."""
        cfg = self.config(trust_code=trust_code)
        source = str(self.path / self.CONFIG)
        if not self.has(self.RECIPE):
            if not cfg.model:
                raise RunError(f"{source} names no model")
            return build_model(cfg.model, cfg.model_kwargs, source=source)
        if not cfg.teacher:
            raise RunError(f"{source} names no teacher for the student recipe {self.path / self.RECIPE}")
        recipe, placement = self.recipe()
        try:
            student = apply_recipe(build_model(cfg.teacher, cfg.teacher_kwargs, source=source), recipe)
            return attach_red(student.module, student.stage_map, placement) if placement else student.module
        except PassError as e:
            raise RunError(f"{self.path}: cannot rebuild the student: {e}") from None

    def load_model(self, weights: str | None = None, *, trust_code: bool = False) -> nn.Module:
        """:meth:`build_model` with the weights of ``weights`` (default :meth:`weights_file`), in eval mode.

        Without any weights file yet the model keeps its fresh initialisation.
        """
        model = self.build_model(trust_code=trust_code)
        name = weights or next((n for n in WEIGHTS if self.has(n)), None)
        if name is not None:
            load_weights(model, self.path / name, "weights")
        return model.eval()


def load_weights(model: nn.Module, path: str | Path, what: str = "teacher weights") -> None:
    """Load a state_dict file, the ``model`` entry of a checkpoint, or a run directory's weights into ``model``."""
    if Path(path).is_dir():
        run = RunDir(path)
        path = run / run.weights_file()
    state = load_torch(path, what)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{path}: not a state_dict or a memplan checkpoint")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"{path}: the {what} do not fit the model ({first[:200]})") from None
