"""Safe file writes: atomic, never onto a non-regular file, no temporary left behind, umask respected.

Every file memplan writes (JSON, reports, recipes, checkpoints, ONNX models, plots) goes through
:func:`atomic_write`: the data goes to a temporary file in the destination's directory, is flushed
and fsynced, and then replaces the destination with ``os.replace``, so a reader sees the old file
or the new one, never half of one (a full disk leaves the old file untouched). A destination that
exists and is not a regular file (a directory, a FIFO, a device node, a socket) is refused with a
:class:`WriteError`; a symlink to a regular file is written through (the link is kept).

Example:
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> write_text_atomic(f"{d}/a.txt", "hello")
    >>> open(f"{d}/a.txt").read(), sorted(os.listdir(d))
    ('hello', ['a.txt'])
    >>> write_text_atomic(d, "x")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    memplan.io.WriteError: cannot write '...': it exists and is a directory, not a regular file
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from memplan.errors import MemplanError

_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


class WriteError(MemplanError):
    """A destination memplan refuses or fails to write (one line: what and why)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_destination(path: str | Path) -> Path:
    """``path`` resolved through symlinks; refuses an existing non-regular file and a missing parent dir."""
    path = Path(path)
    target = path.resolve() if path.is_symlink() else path
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise WriteError(f"cannot write '{path}': {e.strerror or e}") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise WriteError(f"cannot write '{path}': it exists and is {kind}, not a regular file")
    parent = target.parent
    if parent.exists() and not parent.is_dir():
        raise WriteError(f"cannot write '{path}': '{parent}' is not a directory")
    return target


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", make_parents: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path``, on any error it is removed."""
    target = check_destination(path)
    try:
        if make_parents:
            target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(f"cannot write '{path}': {e.strerror or e}") from None
    try:
        existing = os.stat(target).st_mode & 0o777 if target.exists() else 0o666 & ~_umask()
        os.fchmod(fd, existing)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(f"cannot write '{path}': {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (module docstring)."""
    with atomic_write(path, "w") as f:
        f.write(text)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def write_json(doc: Any, dest: str | Path) -> None:
    """Write ``doc`` as indented JSON to ``dest`` (``-`` = stdout), atomically for files."""
    text = json.dumps(doc, indent=2) + "\n"
    if str(dest) == "-":
        sys.stdout.write(text)
    else:
        write_text_atomic(dest, text)


def load_torch(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; an unreadable or unsafe file raises a one-line MemplanError.

    A pickle that names code (anything ``weights_only`` refuses) is refused, not run.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MemplanError(f"{what} '{path}' does not exist") from None
    except IsADirectoryError:
        raise MemplanError(f"{what} '{path}' is a directory, not a file") from None
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise MemplanError(f"refusing {what} '{path}': it is not a plain weights file ({first[:160]})") from None
    except (OSError, RuntimeError, EOFError, ValueError, AttributeError, ImportError, IndexError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MemplanError(f"cannot read {what} '{path}': {type(e).__name__}: {first[:160]}") from None
