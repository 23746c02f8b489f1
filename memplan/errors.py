"""Errors memplan raises for bad user input; the CLI prints them as one line and exits 2."""

from __future__ import annotations


def describe_error(e: BaseException) -> str:
    """``"Type: first line of the message"``, for one-line user errors.

    Example:
        >>> describe_error(OSError(2, "No such file"))
        'FileNotFoundError: [Errno 2] No such file'
    """
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


class MemplanError(Exception):
    """A user-facing error: bad model spec, bad shape, uncapturable model, missing package.

    Example:
        >>> raise MemplanError("bad input shape '1,x': not a comma-separated list of integers")
        Traceback (most recent call last):
        ...
        memplan.errors.MemplanError: bad input shape '1,x': not a comma-separated list of integers
    """


class CaptureError(MemplanError):
    """Neither torch.fx symbolic tracing nor torch.export could capture the model."""
