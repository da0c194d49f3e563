"""``halfclose demo``: reproduce the sidecar half-close leak in the lab, fix it, prevent it.

    halfclose demo [--prefix hc-demo] [--connections 3]

Root.  Under a minute; narration on stdout, a progress line while conntrack
counts down (one line per wait when stdout is not a terminal).  Exit 0 only if
every step showed what it claims; 1 if one did not; the lab is torn down in
every case, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

from halfclose.agent.kernel.netns import require_root
from halfclose.demo.console import Console
from halfclose.demo.script import DemoFailed, DemoSettings, run_demo

MAX_CONNECTIONS = 50
_DEFAULTS = DemoSettings()


def _connections(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_CONNECTIONS:
        raise argparse.ArgumentTypeError(f"invalid count {text!r} (1..{MAX_CONNECTIONS})")
    return int(text)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", help="reproduce the sidecar half-close leak in a built-in lab, then fix it (root)"
    )
    p.add_argument("--prefix", default=_DEFAULTS.prefix, help="lab name prefix (default hc-demo)")
    p.add_argument(
        "--connections",
        type=_connections,
        default=_DEFAULTS.connections,
        metavar="N",
        help=f"connections to leak, then to save (default {_DEFAULTS.connections})",
    )
    p.set_defaults(func=run)


def _terminate(_signum: int, _frame: FrameType | None) -> None:
    # SIGTERM takes the same road as Ctrl-C: through every finally, lab down.
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    # The real commands, in-process (imported here: main imports this module).
    from halfclose.cli.main import main as halfclose_main  # noqa: PLC0415

    require_root()
    settings = DemoSettings(prefix=args.prefix, connections=args.connections)
    previous = signal.signal(signal.SIGTERM, _terminate)
    console = Console()
    try:
        run_demo(settings, console, halfclose_main)
    except DemoFailed as exc:
        print(f"halfclose demo: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    console.say("")
    console.say("Demo complete: every step showed what it claimed.")
    return 0
