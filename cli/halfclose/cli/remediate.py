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
from typing import Any

from halfclose.agent.core.model import Outcome
from halfclose.agent.core.plan import (
    DEFAULT_CLOSE_WAIT_TIMEOUT,
    DEFAULT_MAX_KILLS,
    DEFAULT_MIN_IDLE_SECONDS,
    MAX_CLOSE_WAIT_TIMEOUT,
    ActionKind,
    ActionSettings,
    FindingOutcome,
    make_plan,
)
from halfclose.agent.engine import report
from halfclose.agent.engine.act import Executor
from halfclose.agent.engine.ctpatch import DEFAULT_STATE_DIR, CloseWaitPatcher, PatchReport
from halfclose.agent.engine.scan import Scanner, ScanResult


class ActionOutcomes(dict[int, report.FindingOutcome]):
    """Outcomes by socket cookie (what the report reads), plus the full records.

    ``details`` keeps the richer per-finding fields (``would``, ``upstream_closed``,
    timeouts) and ``extra`` what a netns-wide action reports, for the JSON.
    """

    def __init__(self) -> None:
        super().__init__()
        self.details: dict[int, dict[str, object]] = {}
        self.extra: dict[str, Any] = {}
        self.notes: list[str] = []


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


def to_report(o: FindingOutcome) -> report.FindingOutcome:
    # design.md §4: a skip is action "none" with a reason.
    action = Outcome.NONE if o.outcome is Outcome.SKIPPED else o.outcome
    return report.FindingOutcome(
        action=action, error=o.error, reason=o.reason.value if o.reason else None
    )


def collect(outcomes: list[FindingOutcome]) -> ActionOutcomes:
    out = ActionOutcomes()
    for o in outcomes:
        cookie = o.finding.socket.cookie
        out[cookie] = to_report(o)
        out.details[cookie] = o.to_json_fields()
    return out


def _socket_action(
    action: ActionKind,
) -> Callable[[Scanner, ScanResult, argparse.Namespace], ActionOutcomes]:
    def run(scanner: Scanner, result: ScanResult, args: argparse.Namespace) -> ActionOutcomes:
        plan = make_plan(result.findings, result.capture_ports, action_settings(action, args))
        executor = Executor(scanner.sockdiag, scanner.conntrack)
        out = collect(executor.execute(plan))
        if action is ActionKind.KILL and not plan.settings.dry_run:
            out.extra["kill_summary"] = executor.summary.to_json_dict()
            out.notes.append(executor.summary.describe())
        return out

    return run


def patch_conntrack(
    scanner: Scanner, result: ScanResult, args: argparse.Namespace
) -> ActionOutcomes:
    settings = action_settings(ActionKind.PATCH_CONNTRACK, args)
    plan = make_plan(result.findings, result.capture_ports, settings)
    out = collect([FindingOutcome(d.finding, Outcome.SKIPPED, d.reason) for d in plan.decisions])
    state_dir = args.state_dir or os.environ.get("HALFCLOSE_STATE_DIR") or DEFAULT_STATE_DIR
    patch: PatchReport = CloseWaitPatcher(state_dir).patch(
        scanner.handle, settings.close_wait_timeout, dry_run=settings.dry_run
    )
    out.extra["conntrack_patch"] = patch.to_json_dict()
    out.notes.append(patch.describe())
    if patch.changed:
        out.notes.append(f"undo with: halfclose conntrack restore --netns {scanner.handle.path}")
    return out


ACTIONS: dict[str, Callable[[Scanner, ScanResult, argparse.Namespace], ActionOutcomes]] = {
    str(ActionKind.KILL): _socket_action(ActionKind.KILL),
    str(ActionKind.EXTEND_CONNTRACK): _socket_action(ActionKind.EXTEND_CONNTRACK),
    str(ActionKind.PATCH_CONNTRACK): patch_conntrack,
}


def decorate_json(doc: dict[str, Any], result: ScanResult, outcomes: object) -> dict[str, Any]:
    """Add the remediation's extra fields to ``report.to_json_dict``'s document.

    Additive to design.md §4: per finding ``would``, ``upstream_closed``,
    ``timeout_before``/``timeout_after``; top level ``conntrack_patch``.  The
    document lists findings in ``result.findings`` order.
    """
    if not isinstance(outcomes, ActionOutcomes):
        return doc
    for finding, item in zip(result.findings, doc["findings"], strict=True):
        item.update(outcomes.details.get(finding.socket.cookie, {}))
        if finding.reason is not None:
            # An unproven finding's reason is the proof's missing part (§4).
            item["reason"] = str(finding.reason)
    doc.update(outcomes.extra)
    return doc


def notes(outcomes: object) -> list[str]:
    """Lines a person should read after the table (a netns-wide change, how to undo it)."""
    return list(outcomes.notes) if isinstance(outcomes, ActionOutcomes) else []
