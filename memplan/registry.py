"""One registry type for everything memplan looks up by name: models, data formats, distillation
methods, LR schedules, commands, model-spec prefixes.

One duplicate policy everywhere: registering a name twice raises :class:`DuplicateNameError`
(remove the old entry with :meth:`Registry.unregister` first). Looking up an unknown name raises
:class:`UnknownNameError` (a :class:`~memplan.errors.MemplanError`) that lists the known names.

Example:
    >>> colors = Registry("color")
    >>> @colors.register("red")
    ... def _red() -> str:
    ...     return "#f00"
    >>> colors["red"](), "red" in colors, colors.names()
    ('#f00', True, ['red'])
    >>> colors["blue"]
    Traceback (most recent call last):
    ...
    memplan.registry.UnknownNameError: unknown color 'blue'; known: red
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from memplan.errors import MemplanError

T = TypeVar("T")


class UnknownNameError(MemplanError, KeyError):
    """A name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(MemplanError):
    """A name registered twice."""


class Registry(Generic[T]):
    """Name -> object, with optional per-entry metadata (``register(name, **meta)``)."""

    def __init__(self, kind: str, unknown_error: type[UnknownNameError] = UnknownNameError) -> None:
        self.kind = kind
        self._unknown = unknown_error
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str | None = None, **meta: Any) -> Callable[[T], T]:
        """Decorator adding an object under ``name`` (default: its ``__name__``)."""

        def add(obj: T) -> T:
            self.add(name or obj.__name__, obj, **meta)
            return obj

        return add

    def add(self, name: str, obj: T, **meta: Any) -> None:
        """Register ``obj`` under ``name``; a taken name raises :class:`DuplicateNameError`."""
        if name in self._items:
            raise DuplicateNameError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj
        self._meta[name] = dict(meta)

    def unregister(self, name: str) -> T:
        """Remove and return an entry."""
        self._meta.pop(name, None)
        return self._items.pop(name)

    def __getitem__(self, name: str) -> T:
        if name not in self._items:
            raise self._unknown(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._items[name]

    def meta(self, name: str) -> dict[str, Any]:
        """The metadata given at registration."""
        self[name]
        return self._meta[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """``(name, object)`` pairs, sorted by name."""
        return sorted(self._items.items())

    def __delitem__(self, name: str) -> None:
        self.unregister(name)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
