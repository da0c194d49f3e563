"""The remediation actions of ``halfclose scan`` (docs/remediation.md).

    halfclose scan ... --action kill|extend-conntrack|patch-conntrack
                       [--dry-run] [--min-idle S] [--max-kills N] [--close-wait-timeout S]

``cli/scan.py`` registers ``ACTIONS`` and ``add_arguments``; each runner turns
the scan's findings into a plan (pure), executes it with the scanner's netlink
sockets (already inside the target netns) and hands back each finding's outcome.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from halfclose.agent.core.outcome import ActionReport
from halfclose.agent.core.plan import (
    DEFAULT_CLOSE_WAIT_TIMEOUT,
    DEFAULT_MAX_KILLS,
    DEFAULT_MIN_IDLE_SECONDS,
    MAX_CLOSE_WAIT_TIMEOUT,
    ActionKind,
    ActionSettings,
    make_plan,
)
from halfclose.agent.engine.act import Executor, skipped
from halfclose.agent.engine.ctpatch import DEFAULT_STATE_DIR, CloseWaitPatcher
from halfclose.agent.engine.scan import Scanner, ScanResult

ActionRunner = Callable[[Scanner, ScanResult, argparse.Namespace], ActionReport]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="show what the action would do; change nothing",
    )
    p.add_argument(
        "--max-kills",
        type=_count,
        default=DEFAULT_MAX_KILLS,
        metavar="N",
        help=f"kill at most N sockets per scan, collisions first, then longest idle "
        f"(default {DEFAULT_MAX_KILLS})",
    )
    p.add_argument(
        "--close-wait-timeout",
        type=_timeout,
        default=DEFAULT_CLOSE_WAIT_TIMEOUT,
        metavar="SECONDS",
        help="CLOSE_WAIT timeout given to an extended entry or a patched netns "
        f"(default {DEFAULT_CLOSE_WAIT_TIMEOUT})",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where patch-conntrack records the original value "
        f"(default $HALFCLOSE_STATE_DIR or {DEFAULT_STATE_DIR})",
    )


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"invalid count {text!r} (want an integer >= 0)")
    return int(text)


def _timeout(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_CLOSE_WAIT_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"invalid timeout {text!r} (want whole seconds, 1..{MAX_CLOSE_WAIT_TIMEOUT})"
        )
    return int(text)


def action_settings(action: ActionKind, args: argparse.Namespace) -> ActionSettings:
    # --min-idle left out means "the safe default" for kills (see plan.py);
    # the scan itself then reports everything so skips show their reason.
    min_idle = args.min_idle if args.min_idle is not None else DEFAULT_MIN_IDLE_SECONDS
    return ActionSettings(
        action=action,
        min_idle_seconds=min_idle,
        max_kills=args.max_kills,
        dry_run=args.dry_run,
        close_wait_timeout=args.close_wait_timeout,
    )


def _socket_action(action: ActionKind) -> ActionRunner:
    def run(scanner: Scanner, result: ScanResult, args: argparse.Namespace) -> ActionReport:
        plan = make_plan(result.findings, result.capture_ports, action_settings(action, args))
        # The CLI may wait for the proxy to close its upstream legs (bounded).
        return Executor(scanner.sockdiag, scanner.conntrack).remediate(plan)

    return run


def patch_conntrack(scanner: Scanner, result: ScanResult, args: argparse.Namespace) -> ActionReport:
    settings = action_settings(ActionKind.PATCH_CONNTRACK, args)
    plan = make_plan(result.findings, result.capture_ports, settings)
    state_dir = args.state_dir or os.environ.get("HALFCLOSE_STATE_DIR") or DEFAULT_STATE_DIR
    patch = CloseWaitPatcher(state_dir).patch(
        scanner.handle, settings.close_wait_timeout, dry_run=settings.dry_run
    )
    return skipped(plan).replace(patch=patch)


ACTIONS: dict[str, ActionRunner] = {
    str(ActionKind.KILL): _socket_action(ActionKind.KILL),
    str(ActionKind.EXTEND_CONNTRACK): _socket_action(ActionKind.EXTEND_CONNTRACK),
    str(ActionKind.PATCH_CONNTRACK): patch_conntrack,
}
