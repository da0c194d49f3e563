"""``halfclose`` console script: one parser, one subcommand module each.

Each subcommand module exposes ``register(subparsers)`` which adds its parser
and sets ``func`` (``(argparse.Namespace) -> int``).  This module owns the
one rule every subcommand shares: a ``UserError`` becomes one line on stderr
and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from halfclose.errors import UserError

# Subcommand modules, imported lazily so `halfclose lab --help` does not pay
# for the Kubernetes client and a missing optional piece breaks only itself.
SUBCOMMANDS = ("scan", "lab", "demo", "conntrack")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints usage + message; keep it to one line (bad input: one line, exit 2).
        raise UserError(f"{self.prog}: {message}")


def _named(argv: Sequence[str]) -> tuple[str, ...]:
    """The subcommands to register for ``argv``: the one it names, if it names one.

    Registering a subcommand imports its module; ``halfclose scan`` need not
    import the lab and the demo.  Anything else (no command, ``--help``, a
    typo) gets every subcommand, so the messages are the full parser's.
    """
    if argv and argv[0] in SUBCOMMANDS:
        return (argv[0],)
    return SUBCOMMANDS


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="halfclose", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in SUBCOMMANDS if argv is None else _named(argv):
        try:
            module = importlib.import_module(f"halfclose.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"halfclose.cli.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        given = sys.argv[1:] if argv is None else list(argv)
        args = build_parser(given).parse_args(given)
        return int(args.func(args))
    except UserError as exc:
        print(
            f"halfclose: error: {exc}" if not str(exc).startswith("halfclose") else str(exc),
            file=sys.stderr,
        )
        return exc.exit_code
    except BrokenPipeError:
        # `halfclose scan ... | head`: the reader went away; not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("halfclose: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
