"""``halfclose scan``: find leaked, collision, at-risk and unproven sidecar sockets in one netns.

    halfclose scan (--netns NAME|PATH | --pid PID) [--capture-ports 15001,15006]
                   [--min-idle SECONDS] [--output table|json] [-p|--processes]
                   [--action report|kill|extend-conntrack|patch-conntrack] [--dry-run]
                   [--max-kills N] [--close-wait-timeout SECONDS] [--state-dir DIR]

Exit 0 when the scan ran (findings or not), 2 with one line on stderr on bad input.

Actions are pluggable: ``ACTIONS`` maps an ``--action`` name to a function run
after the scan, which returns the engine's ``ActionReport`` (one outcome per
finding).  ``report`` does nothing; remediation registers ``kill`` and friends.
JSON is compact (C-encoded) unless ``--indent N`` asks for pretty printing.
The process holding each socket is looked up only with ``-p`` (as ``ss -p``):
it reads every fd link of the netns's processes, which at 20,000 leaks costs as
much as the whole rest of the scan; without it ``pid``/``process`` are null and
the legs are paired by socket uid, as the agent pairs them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from itertools import islice

from halfclose.agent.core.outcome import ActionReport, report_only
from halfclose.agent.engine.nogc import gc_paused
from halfclose.agent.engine.report import json_chunks, render_notes, table_lines, to_json_dict
from halfclose.agent.engine.scan import Scanner, ScanResult, ScanSettings
from halfclose.agent.kernel.netns import (
    NetnsHandle,
    host_netns_path,
    is_kernel_thread,
    require_root,
)
from halfclose.cli import remediate
from halfclose.errors import UserError


def _report(_scanner: Scanner, result: ScanResult, _args: argparse.Namespace) -> ActionReport:
    return report_only(result.findings)


ACTIONS: dict[str, remediate.ActionRunner] = {"report": _report}
ACTIONS.update(remediate.ACTIONS)  # kill, extend-conntrack, patch-conntrack


def parse_ports(text: str) -> frozenset[int]:
    """``"15001,15006"`` -> {15001, 15006}; every item an integer in 1..65535."""
    ports: set[int] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item.isdigit():
            raise argparse.ArgumentTypeError(f"invalid port {item!r} (want e.g. 15001,15006)")
        port = int(item)
        if not 1 <= port <= 65535:
            raise argparse.ArgumentTypeError(f"port {port} out of range 1-65535")
        ports.add(port)
    return frozenset(ports)


def _pid(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"invalid pid {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be >= 0, got {text!r}")
    return value


def _indent(text: str) -> int:
    if not text.isdigit() or int(text) > 16:
        raise argparse.ArgumentTypeError(f"invalid indent {text!r} (want 0..16)")
    return int(text)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("scan", help="find leaked and at-risk half-closed sidecar sockets")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--netns", metavar="NAME|PATH", help="`ip netns` name or nsfs path")
    target.add_argument("--pid", type=_pid, help="scan the network namespace of this process")
    p.add_argument(
        "--capture-ports",
        type=parse_ports,
        metavar="P1,P2",
        help="judge only these ports (default: the netns's TCP NAT capture ports); "
        "a port no NAT rule or DST_NAT entry captures yields 'unproven', never 'leaked'",
    )
    p.add_argument(
        "--min-idle",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="report only sockets idle at least this long (default 0); "
        "--action kill kills only leaks idle that long (default 60) and collisions "
        "regardless; nothing is killed without the four-part proof (docs/detection.md)",
    )
    p.add_argument(
        "-p",
        "--processes",
        action="store_true",
        help="show the process holding each socket, as `ss -p` does (reads every fd "
        "of the netns's processes: at 20k leaks as long as the rest of the scan)",
    )
    p.add_argument("--action", choices=sorted(ACTIONS), default="report")
    remediate.add_arguments(p)
    p.add_argument("--output", choices=("table", "json"), default="table")
    p.add_argument(
        "--indent",
        type=_indent,
        default=None,
        metavar="N",
        help="pretty-print --output json with N spaces (default: compact, fast at 20k findings)",
    )
    p.set_defaults(func=run)


def open_target(args: argparse.Namespace, proc_root: str) -> NetnsHandle:
    require_root()
    if args.pid is None:
        return NetnsHandle.from_spec(args.netns)
    handle = NetnsHandle.from_pid(args.pid, proc_root)
    # A pid in the host netns (pid 1, a kernel thread, any host daemon) is
    # almost always a mistake: the scan (and an action) would touch the
    # node's own sockets.  The host is a target only when asked for by path.
    try:
        host = is_kernel_thread(args.pid, proc_root) or handle.is_host(proc_root)
        reference = host_netns_path(proc_root) if host else ""
    except OSError as exc:
        handle.close()
        raise UserError(
            f"cannot tell whether pid {args.pid} is in the host network namespace "
            f"({exc.strerror}); give the namespace by --netns PATH"
        ) from None
    if host:
        handle.close()
        raise UserError(
            f"pid {args.pid} is in the host network namespace: refusing the host as a target "
            f"by --pid (to target it on purpose: --netns {reference})"
        )
    return handle


def write_lines(lines: Iterable[str], batch: int = 1024) -> None:
    """Write ``lines`` to stdout, ``batch`` at a time (never the whole text at once)."""
    it = iter(lines)
    while chunk := list(islice(it, batch)):
        sys.stdout.write("\n".join(chunk) + "\n")


def run(args: argparse.Namespace) -> int:
    # The cyclic collector is paused for the whole command, not only inside
    # the scan: at 20k leaks the scan leaves ~200k acyclic objects (records,
    # findings, outcomes), and each collection after it walked them all, the
    # deferred one at the scan's end and then some 30 while the outcomes were
    # built (measured: 335 ms of the CLI's 1.1 s of CPU).  Reference counting
    # frees everything; the collector resumes once ``_run``'s objects are gone.
    with gc_paused():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    # The environment is read here, at the entry point, and nowhere below.
    proc_root = os.environ.get("HOST_PROC", "/proc")
    settings = ScanSettings(
        capture_ports=args.capture_ports,
        min_idle_seconds=args.min_idle or 0.0,
        proc_root=proc_root,
        owners=args.processes,
    )
    with open_target(args, proc_root) as handle:
        try:
            scanner = Scanner(handle)
        except OSError as exc:
            raise UserError(f"cannot open netlink sockets in {handle.label}: {exc}") from None
        with scanner:
            result = scanner.scan(settings)
            report = ACTIONS[args.action](scanner, result, args)
            undo = handle.path
    if args.output == "json":
        if args.indent is None:
            # Written piece by piece: the whole document (20k findings: 6 MB
            # of text, ~18 MB as dicts) is never held, nor copied for the
            # newline or the encoding.
            write = sys.stdout.write
            for piece in json_chunks(result, report):
                write(piece)
            write("\n")
        else:
            sys.stdout.write(json.dumps(to_json_dict(result, report), indent=args.indent) + "\n")
    else:
        write_lines(table_lines(result, report))
        for note in render_notes(report):
            print(note)
        if report.patch is not None and report.patch.changed:
            print(f"undo with: halfclose conntrack restore --netns {undo}")
    return 0
