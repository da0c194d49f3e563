"""``halfclose conntrack status|restore``: the netns-wide CLOSE_WAIT timeout patch.

    halfclose conntrack status  (--netns NAME|PATH | --pid PID) [--output table|json]
    halfclose conntrack restore (--netns NAME|PATH | --pid PID) [--dry-run] [--force]

``scan --action patch-conntrack`` sets the timeout and records the original in
a state file; ``restore`` puts the original back (idempotent: nothing recorded
is nothing to do).  See docs/remediation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from halfclose.agent.core.outcome import PatchReport
from halfclose.agent.engine.ctpatch import DEFAULT_STATE_DIR, CloseWaitPatcher
from halfclose.cli.scan import open_target


def _pid(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"invalid pid {text!r}")
    return int(text)


def add_state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help=f"where patch records live (default $HALFCLOSE_STATE_DIR or {DEFAULT_STATE_DIR})",
    )


def state_dir(args: argparse.Namespace) -> str:
    # The environment is read here, at the entry point, and nowhere below.
    return str(
        getattr(args, "state_dir", None)
        or os.environ.get("HALFCLOSE_STATE_DIR")
        or DEFAULT_STATE_DIR
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("conntrack", help="show or restore a patched conntrack CLOSE_WAIT timeout")
    verbs = p.add_subparsers(dest="verb", required=True, parser_class=type(p))
    for verb, text in (
        ("status", "the netns's CLOSE_WAIT timeout and whether halfclose patched it"),
        ("restore", "put back the CLOSE_WAIT timeout recorded before patch-conntrack"),
    ):
        v = verbs.add_parser(verb, help=text)
        target = v.add_mutually_exclusive_group(required=True)
        target.add_argument("--netns", metavar="NAME|PATH", help="`ip netns` name or nsfs path")
        target.add_argument("--pid", type=_pid, help="the network namespace of this process")
        add_state_dir(v)
        v.add_argument("--output", choices=("table", "json"), default="table")
        if verb == "restore":
            v.add_argument("--dry-run", action="store_true", help="show what would change")
            v.add_argument(
                "--force",
                action="store_true",
                help="restore even if someone changed the value since halfclose patched it",
            )
        v.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The same target rules as scan: a --pid in the host netns is refused.
    handle = open_target(args, os.environ.get("HOST_PROC", "/proc"))
    with handle:
        patcher = CloseWaitPatcher(state_dir(args))
        report: PatchReport
        if args.verb == "status":
            report = patcher.status(handle)
        else:
            report = patcher.restore(handle, dry_run=args.dry_run, force=args.force)
    if args.output == "json":
        json.dump(report.to_json_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(report.describe())
    return 0
