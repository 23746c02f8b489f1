"""The ``memplan`` command line. Each subcommand lives in ``memplan/commands/<name>.py`` and registers
itself with :func:`command`; ``main`` discovers them. User errors print one line and exit 2.

Example:
    $ memplan analyze zoo:resnet50 --input 1,3,224,224 --json -
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Callable, Sequence
from typing import Any

from memplan.errors import MemplanError
from memplan.registry import Registry

Configure = Callable[[argparse.ArgumentParser], None]
COMMANDS: Registry[tuple[str, Configure]] = Registry("command")


def command(name: str, help: str) -> Callable[[Configure], Configure]:  # noqa: A002
    """Register a subcommand: decorate its parser configurator; it must set ``func`` via defaults.

    Example:
        >>> @command("hello", "say hello")
        ... def _configure(p):
        ...     p.set_defaults(func=lambda args: print("hello") or 0)
        >>> _ = COMMANDS.unregister("hello")
    """

    def deco(configure: Configure) -> Configure:
        COMMANDS.add(name, (help, configure))
        return configure

    return deco


def allow_intermixed(p: argparse.ArgumentParser) -> None:
    """Let ``p`` take positionals after flags (``MODEL --epochs 1 lr=0.1``).

    Plain argparse assigns each positional once, at the first run of positional strings, so the
    overrides after the flags would be "unrecognized"; the subcommand parser parses intermixed.
    """
    plain = p.parse_known_args

    def parse(args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None) -> Any:
        p.parse_known_args = plain  # parse_known_intermixed_args calls parse_known_args itself
        try:
            return p.parse_known_intermixed_args(args, namespace)
        finally:
            p.parse_known_args = parse

    p.parse_known_args = parse


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every discovered subcommand."""
    import memplan.commands as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"memplan.commands.{info.name}")
    parser = argparse.ArgumentParser(prog="memplan", description="Peak activation memory of CNNs, and less of it.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, configure) in COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memplan`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MemplanError as e:
        print(f"memplan {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"memplan {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
