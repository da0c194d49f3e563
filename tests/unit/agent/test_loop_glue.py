"""Small decisions of the agent loop: error reasons, policy -> action settings."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from halfclose.agent.core.plan import ActionKind
from halfclose.agent.daemon.loop import action_settings, error_reason, new_warnings, wants_sysctl
from halfclose.api.policy import parse_policy
from halfclose.errors import (
    ApiConflict,
    ConntrackUnavailable,
    NetnsGone,
    PermissionDenied,
    RulesUnreadable,
    UserError,
)


def _wrapped(cause: OSError) -> UserError:
    """An untyped UserError raised ``from None`` while handling ``cause`` (older code)."""
    try:
        raise cause
    except OSError:
        try:
            raise UserError("cannot enter netns") from None
        except UserError as exc:
            return exc
    raise AssertionError


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        # Typed faults say what they are; an untyped UserError is never "gone".
        (NetnsGone("netns path does not exist"), "netns_gone"),
        (PermissionDenied("cannot enter netns: Operation not permitted"), "permission"),
        (RulesUnreadable("cannot read NAT rules"), "rules_unreadable"),
        (ConntrackUnavailable("no conntrack"), "conntrack_unavailable"),
        (ApiConflict("409"), "api_conflict"),
        (UserError("--close-wait-timeout must be > 0"), "user"),
        (_wrapped(OSError(errno.EPERM, "no")), "permission"),
        (_wrapped(OSError(errno.ENOENT, "gone")), "netns_gone"),
        (PermissionError(errno.EPERM, "no"), "permission"),
        (OSError(errno.ENOENT, "gone"), "netns_gone"),
        (OSError(errno.ESRCH, "no process"), "netns_gone"),
        (OSError(errno.EPERM, "no"), "permission"),
        (OSError(errno.EACCES, "no"), "permission"),
        (OSError(errno.ENOBUFS, "overrun"), "netlink"),
        (OSError(errno.EPROTO, "bad"), "netlink"),
        (OSError("no errno"), "os"),
        (ValueError("truncated message"), "internal"),
    ],
)
def test_error_reasons(exc: BaseException, reason: str) -> None:
    assert error_reason(exc) == reason


def make(**spec: Any) -> Any:
    return parse_policy(
        {
            "apiVersion": "halfclose.io/v1alpha1",
            "kind": "HalfClosePolicy",
            "metadata": {"name": "p"},
            "spec": {"namespaces": ["a"], **spec},
        }
    )


def test_action_mapping() -> None:
    assert action_settings(make(), 5).action is ActionKind.REPORT
    kill = action_settings(
        make(action="KillSockets", dryRun=True, thresholds={"minIdleSeconds": 7}), 5
    )
    assert (kill.action, kill.max_kills, kill.dry_run, kill.min_idle_seconds) == (
        ActionKind.KILL,
        5,
        True,
        7.0,
    )
    per_entry = make(action="PatchConntrack")
    assert action_settings(per_entry, 0).action is ActionKind.EXTEND_CONNTRACK
    assert not wants_sysctl(per_entry)
    sysctl = make(
        action="PatchConntrack", conntrack={"strategy": "Sysctl", "closeWaitTimeoutSeconds": 900}
    )
    settings = action_settings(sysctl, 0)
    assert (settings.action, settings.close_wait_timeout) == (ActionKind.PATCH_CONNTRACK, 900)
    assert wants_sysctl(sysctl)


def test_a_persisting_scan_warning_is_counted_once_and_again_after_it_cleared() -> None:
    rules = "NAT rules from iptables-legacy could not be read (Permission denied)"
    assert new_warnings((), (rules,)) == [rules]
    assert new_warnings((rules,), (rules,)) == []  # every later scan: not again
    assert new_warnings((rules,), ()) == []
    assert new_warnings((), (rules,)) == [rules]  # it came back
