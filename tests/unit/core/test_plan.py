"""The action planner and the pre-action re-checks (pure; agent/core/plan.py)."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from halfclose.agent.core.model import (
    Capture,
    ConntrackEntry,
    Endpoint,
    Finding,
    FlowTuple,
    Kind,
    Outcome,
    Owner,
    SocketRecord,
    TcpState,
    UnprovenReason,
)
from halfclose.agent.core.outcome import FindingOutcome
from halfclose.agent.core.plan import (
    DEFAULT_MIN_IDLE_SECONDS,
    ActionKind,
    ActionSettings,
    Decision,
    Op,
    SkipReason,
    make_plan,
    recheck_extend,
    recheck_kill,
)
from halfclose.errors import UserError

PORTS = frozenset({15001, 15006})
_cookies = iter(range(1000, 100000))


def sock(
    port: int = 15001,
    *,
    app_port: int = 40000,
    state: TcpState = TcpState.FIN_WAIT2,
    idle_ms: int | None = 120_000,
    inode: int = 77,
    cookie: int | None = None,
) -> SocketRecord:
    return SocketRecord(
        state=state,
        local=Endpoint(ipaddress.ip_address("127.0.0.1"), port),
        peer=Endpoint(ipaddress.ip_address("192.0.2.1"), app_port),
        cookie=next(_cookies) if cookie is None else cookie,
        inode=inode,
        uid=1337,
        last_data_recv_ms=idle_ms,
        last_ack_recv_ms=idle_ms,
        last_data_sent_ms=idle_ms,
    )


def entry(
    s: SocketRecord, state: str = "CLOSE_WAIT", status: int = 0x1AE, eid: int = 9
) -> ConntrackEntry:
    reply = s.nat_reply_tuple
    original = FlowTuple(s.peer.ip, s.peer.port, ipaddress.ip_address("198.51.100.7"), 80)
    return ConntrackEntry(original, reply, state, timeout=30, status=status, entry_id=eid)


PROOF = {"capture": Capture.RULE, "min_silence_seconds": 60.0}


def leaked(s: SocketRecord | None = None) -> Finding:
    return Finding(Kind.LEAKED, s or sock(), Owner(10, "proxy"), **PROOF)  # type: ignore[arg-type]


def collision(s: SocketRecord | None = None, state: str = "SYN_SENT") -> Finding:
    s = s or sock()
    return Finding(Kind.COLLISION, s, Owner(10, "proxy"), entry(s, state), **PROOF)  # type: ignore[arg-type]


def unproven(s: SocketRecord | None = None) -> Finding:
    return Finding(
        Kind.UNPROVEN,
        s or sock(),
        Owner(10, "proxy"),
        reason=UnprovenReason.ENTRY_REMOVED_EARLY,
        **PROOF,  # type: ignore[arg-type]
    )


def at_risk(s: SocketRecord | None = None, **kw: object) -> Finding:
    s = s or sock()
    return Finding(Kind.AT_RISK, s, Owner(10, "proxy"), entry=entry(s, **kw), **PROOF)  # type: ignore[arg-type]


def settings(action: ActionKind, **kw: object) -> ActionSettings:
    kw.setdefault("min_idle_seconds", 10.0)
    return ActionSettings(action=action, **kw)  # type: ignore[arg-type]


def ops(plan_decisions: tuple[Decision, ...]) -> list[tuple[Op, SkipReason | None]]:
    return [(d.op, d.reason) for d in plan_decisions]


class TestKill:
    def test_kills_only_leaked_sockets(self) -> None:
        findings = [leaked(), at_risk(), leaked(sock(15006))]
        plan = make_plan(findings, PORTS, settings(ActionKind.KILL))
        assert ops(plan.decisions) == [
            (Op.KILL, None),
            (Op.NONE, SkipReason.NOT_LEAKED),
            (Op.KILL, None),
        ]
        assert [d.finding for d in plan.kills] == [findings[0], findings[2]]

    def test_a_leaked_finding_that_carries_an_entry_is_not_killed(self) -> None:
        # Inconsistent input must fail safe: an entry means the FIN can still arrive.
        s = sock()
        f = Finding(Kind.LEAKED, s, None, entry=entry(s))
        assert ops(make_plan([f], PORTS, settings(ActionKind.KILL)).decisions) == [
            (Op.NONE, SkipReason.NOT_LEAKED)
        ]

    @pytest.mark.parametrize(
        ("record", "reason"),
        [
            (sock(8080), SkipReason.NOT_CAPTURE_PORT),
            (sock(state=TcpState.ESTABLISHED), SkipReason.NOT_FIN_WAIT2),
            (sock(state=TcpState.CLOSE_WAIT), SkipReason.NOT_FIN_WAIT2),
            (sock(inode=0), SkipReason.ORPHAN),
            (sock(cookie=0), SkipReason.NO_COOKIE),
            (sock(idle_ms=None), SkipReason.IDLE_UNKNOWN),
            (sock(idle_ms=9_999), SkipReason.TOO_YOUNG),
        ],
    )
    def test_never_kills_what_the_rules_exclude(
        self, record: SocketRecord, reason: SkipReason
    ) -> None:
        plan = make_plan([leaked(record)], PORTS, settings(ActionKind.KILL))
        assert ops(plan.decisions) == [(Op.NONE, reason)]
        assert plan.kills == []

    def test_min_idle_boundary_is_inclusive(self) -> None:
        plan = make_plan([leaked(sock(idle_ms=10_000))], PORTS, settings(ActionKind.KILL))
        assert ops(plan.decisions) == [(Op.KILL, None)]

    def test_idle_is_the_most_recent_of_data_and_ack(self) -> None:
        s = SocketRecord(
            TcpState.FIN_WAIT2,
            Endpoint(ipaddress.ip_address("127.0.0.1"), 15001),
            Endpoint(ipaddress.ip_address("192.0.2.1"), 1234),
            cookie=5,
            inode=3,
            uid=0,
            last_data_recv_ms=600_000,
            last_ack_recv_ms=2_000,  # a recent ACK: the peer is alive
        )
        plan = make_plan([leaked(s)], PORTS, settings(ActionKind.KILL))
        assert ops(plan.decisions) == [(Op.NONE, SkipReason.TOO_YOUNG)]

    def test_max_kills_keeps_the_longest_idle_and_the_findings_order(self) -> None:
        idles = [30_000, 500_000, 20_000, 900_000, 40_000]
        findings = [leaked(sock(app_port=40000 + i, idle_ms=ms)) for i, ms in enumerate(idles)]
        plan = make_plan(findings, PORTS, settings(ActionKind.KILL, max_kills=2))
        assert [d.finding for d in plan.decisions] == findings
        assert [d.finding.socket.idle_seconds for d in plan.kills] == [500.0, 900.0]
        assert sum(d.reason is SkipReason.OVER_MAX_KILLS for d in plan.decisions) == 3

    def test_max_kills_zero_kills_nothing(self) -> None:
        plan = make_plan([leaked()], PORTS, settings(ActionKind.KILL, max_kills=0))
        assert ops(plan.decisions) == [(Op.NONE, SkipReason.OVER_MAX_KILLS)]

    def test_default_min_idle_protects_young_leaks(self) -> None:
        young = leaked(sock(idle_ms=int(DEFAULT_MIN_IDLE_SECONDS * 1000) - 1))
        old = leaked(sock(idle_ms=int(DEFAULT_MIN_IDLE_SECONDS * 1000)))
        plan = make_plan([young, old], PORTS, ActionSettings(action=ActionKind.KILL))
        assert ops(plan.decisions) == [(Op.NONE, SkipReason.TOO_YOUNG), (Op.KILL, None)]


class TestExtend:
    def test_extends_only_at_risk_close_wait_entries(self) -> None:
        findings = [
            at_risk(),
            leaked(),
            at_risk(state="ESTABLISHED"),
            at_risk(status=0x1AE | ConntrackEntry.IPS_FIXED_TIMEOUT),
            at_risk(sock(8080)),
        ]
        plan = make_plan(findings, PORTS, settings(ActionKind.EXTEND_CONNTRACK))
        assert ops(plan.decisions) == [
            (Op.EXTEND, None),
            (Op.NONE, SkipReason.NOT_AT_RISK),
            (Op.NONE, SkipReason.ENTRY_NOT_CLOSE_WAIT),
            (Op.NONE, SkipReason.FIXED_TIMEOUT),
            (Op.NONE, SkipReason.NOT_CAPTURE_PORT),
        ]

    def test_min_idle_does_not_delay_an_extension(self) -> None:
        # Waiting would let the entry expire: prevention must act while young.
        f = at_risk(sock(idle_ms=0))
        plan = make_plan([f], PORTS, ActionSettings(action=ActionKind.EXTEND_CONNTRACK))
        assert ops(plan.decisions) == [(Op.EXTEND, None)]


def test_report_and_patch_touch_no_socket() -> None:
    findings = [leaked(), at_risk()]
    for action, reason in [
        (ActionKind.REPORT, SkipReason.REPORT_ONLY),
        (ActionKind.PATCH_CONNTRACK, SkipReason.NETNS_WIDE),
    ]:
        plan = make_plan(findings, PORTS, settings(action))
        assert ops(plan.decisions) == [(Op.NONE, reason)] * 2


@pytest.mark.parametrize(
    "kw",
    [
        {"min_idle_seconds": -1.0},
        {"max_kills": -1},
        {"close_wait_timeout": 0},
        {"close_wait_timeout": 10**9},
    ],
)
def test_bad_settings_are_user_errors(kw: dict[str, object]) -> None:
    with pytest.raises(UserError):
        ActionSettings(**kw)  # type: ignore[arg-type]


class TestProofKinds:
    def test_unproven_is_never_acted_on(self) -> None:
        for action in (ActionKind.KILL, ActionKind.EXTEND_CONNTRACK):
            plan = make_plan([unproven()], PORTS, settings(action, min_idle_seconds=0))
            assert ops(plan.decisions) == [(Op.NONE, SkipReason.UNPROVEN)]

    def test_a_leak_without_the_proofs_marks_is_not_killed(self) -> None:
        # A LEAKED finding the classifier did not produce (no capture shown).
        f = Finding(Kind.LEAKED, sock(), None)
        plan = make_plan([f], PORTS, settings(ActionKind.KILL, min_idle_seconds=0))
        assert ops(plan.decisions) == [(Op.NONE, SkipReason.UNPROVEN)]

    def test_collisions_go_first_regardless_of_min_idle_within_the_budget(self) -> None:
        old = leaked(sock(idle_ms=900_000))
        young_collisions = [collision(sock(idle_ms=70_000, app_port=p)) for p in (1, 2)]
        findings = [old, *young_collisions]
        plan = make_plan(
            findings, PORTS, settings(ActionKind.KILL, min_idle_seconds=600, max_kills=2)
        )
        assert ops(plan.decisions) == [
            (Op.NONE, SkipReason.OVER_MAX_KILLS),
            (Op.KILL, None),
            (Op.KILL, None),
        ]

    def test_a_collision_needs_an_opening_entry(self) -> None:
        s = sock()
        f = Finding(Kind.COLLISION, s, None, entry(s, "ESTABLISHED"), **PROOF)  # type: ignore[arg-type]
        plan = make_plan([f], PORTS, settings(ActionKind.KILL))
        assert ops(plan.decisions) == [(Op.NONE, SkipReason.NOT_LEAKED)]

    def test_extend_never_touches_a_collision_entry(self) -> None:
        plan = make_plan([collision()], PORTS, settings(ActionKind.EXTEND_CONNTRACK))
        assert ops(plan.decisions) == [(Op.NONE, SkipReason.NOT_AT_RISK)]
        f = at_risk()
        d = Decision(f, Op.EXTEND)
        syn = entry(f.socket, "SYN_SENT")
        assert recheck_extend(d, f.socket, syn, PORTS, 3600) is SkipReason.STATE_CHANGED

    def test_tproxy_socket_passes_the_port_rule_by_being_transparent(self) -> None:
        s = dataclasses.replace(sock(8080), transparent=True)
        f = Finding(Kind.LEAKED, s, None, capture=Capture.TPROXY, min_silence_seconds=60.0)
        plan = make_plan([f], PORTS, settings(ActionKind.KILL))
        assert ops(plan.decisions) == [(Op.KILL, None)]
        plain = dataclasses.replace(s, transparent=False)
        assert recheck_kill(plan.kills[0], plain, None, PORTS) is SkipReason.NOT_CAPTURE_PORT


class TestRecheck:
    def test_kill_rechecks_silence_and_allows_a_collision_entry(self) -> None:
        f = leaked(sock(idle_ms=120_000))
        d = Decision(f, Op.KILL)
        syn = entry(f.socket, "SYN_RECV")
        assert recheck_kill(d, f.socket, syn, PORTS) is None
        spoke = dataclasses.replace(f.socket, last_data_sent_ms=10)
        assert recheck_kill(d, spoke, None, PORTS) is SkipReason.NOT_SILENT
        heard = dataclasses.replace(f.socket, last_ack_recv_ms=59_999)
        assert recheck_kill(d, heard, None, PORTS) is SkipReason.NOT_SILENT
        unknown = dataclasses.replace(f.socket, last_data_sent_ms=None)
        assert recheck_kill(d, unknown, None, PORTS) is SkipReason.UNPROVEN

    def test_kill_proceeds_when_nothing_changed(self) -> None:
        f = leaked()
        assert recheck_kill(Decision(f, Op.KILL), f.socket, None, PORTS) is None

    def test_kill_sees_a_socket_that_went_away(self) -> None:
        f = leaked()
        assert recheck_kill(Decision(f, Op.KILL), None, None, PORTS) is SkipReason.ALREADY_GONE

    def test_kill_sees_a_reused_tuple(self) -> None:
        f = leaked()
        other = sock(app_port=f.socket.peer.port)  # same tuple, new cookie
        assert other.cookie != f.socket.cookie
        reason = recheck_kill(Decision(f, Op.KILL), other, None, PORTS)
        assert reason is SkipReason.ALREADY_GONE

    def test_kill_sees_a_state_change_and_a_returning_entry(self) -> None:
        f = leaked()
        d = Decision(f, Op.KILL)
        tw = SocketRecord(TcpState.TIME_WAIT, f.socket.local, f.socket.peer, f.socket.cookie, 0, 0)
        assert recheck_kill(d, tw, None, PORTS) is SkipReason.STATE_CHANGED
        assert recheck_kill(d, f.socket, entry(f.socket), PORTS) is SkipReason.ENTRY_REAPPEARED

    def test_extend_needs_the_same_live_entry(self) -> None:
        f = at_risk()
        d = Decision(f, Op.EXTEND)
        assert f.entry is not None
        assert recheck_extend(d, f.socket, f.entry, PORTS, 3600) is None
        assert recheck_extend(d, f.socket, None, PORTS, 3600) is SkipReason.ENTRY_GONE
        assert recheck_extend(d, None, f.entry, PORTS, 3600) is SkipReason.ALREADY_GONE
        newer = entry(f.socket, eid=f.entry.entry_id + 1)
        assert recheck_extend(d, f.socket, newer, PORTS, 3600) is SkipReason.STATE_CHANGED
        fixed = entry(f.socket, status=0x1AE | ConntrackEntry.IPS_FIXED_TIMEOUT)
        assert recheck_extend(d, f.socket, fixed, PORTS, 3600) is SkipReason.FIXED_TIMEOUT

    def test_extend_never_shortens_a_timeout(self) -> None:
        f = at_risk()
        assert f.entry is not None and f.entry.timeout == 30
        d = Decision(f, Op.EXTEND)
        assert recheck_extend(d, f.socket, f.entry, PORTS, 30) is SkipReason.LONG_ENOUGH
        assert recheck_extend(d, f.socket, f.entry, PORTS, 31) is None


def test_outcome_json_follows_the_contract() -> None:
    f = leaked()
    skipped = FindingOutcome(f, Outcome.SKIPPED, SkipReason.DRY_RUN, would=Op.KILL)
    assert skipped.to_json_fields() == {"action": "none", "reason": "dry-run", "would": "kill"}
    failed = FindingOutcome(f, Outcome.FAILED, error="EPERM")
    assert failed.to_json_fields() == {"action": "failed", "error": "EPERM"}
    killed = FindingOutcome(f, Outcome.KILLED, upstream_closed=True)
    assert killed.to_json_fields() == {"action": "killed", "upstream_closed": True}
