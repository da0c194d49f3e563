"""The executor's error handling (agent/engine/act.py), for errnos a test can't provoke.

The real kernel paths (kill, already-gone, extend) are covered in
tests/integration/test_kill.py and test_prevention.py.  Here the sock_diag and
ctnetlink adapters are replaced by small in-memory stand-ins so that EPERM,
ESTALE and a failing re-check can be injected: what matters is that a
failure is reported with its errno name and never turns into a kill.
"""

from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass, field

import pytest

from halfclose.agent.core.model import (
    Capture,
    ConntrackEntry,
    Endpoint,
    Finding,
    FlowTuple,
    Kind,
    Outcome,
    SocketRecord,
    TcpState,
)
from halfclose.agent.core.plan import ActionKind, ActionSettings, Op, SkipReason, make_plan
from halfclose.agent.engine.act import ExecSettings, Executor

PORTS = {15001}


def record(port: int, cookie: int, state: TcpState = TcpState.FIN_WAIT2) -> SocketRecord:
    return SocketRecord(
        state,
        Endpoint(ipaddress.ip_address("127.0.0.1"), 15001),
        Endpoint(ipaddress.ip_address("192.0.2.10"), port),
        cookie=cookie,
        inode=cookie,
        uid=1337,
        last_data_recv_ms=600_000,
        last_ack_recv_ms=600_000,
        last_data_sent_ms=600_000,
    )


@dataclass
class FakeDiag:
    """sock_diag by cookie: ``sockets`` is what the kernel holds."""

    sockets: dict[int, SocketRecord]
    destroy_errno: int | None = None
    get_errno: int | None = None
    destroyed: list[int] = field(default_factory=list)

    def get(self, rec: SocketRecord) -> SocketRecord | None:
        if self.get_errno:
            raise OSError(self.get_errno, "injected")
        return self.sockets.get(rec.cookie)

    def destroy(self, rec: SocketRecord) -> None:
        if self.destroy_errno:
            raise OSError(self.destroy_errno, "injected")
        self.destroyed.append(rec.cookie)
        del self.sockets[rec.cookie]

    def get_many(self, records: list[SocketRecord]) -> list[SocketRecord | int | None]:
        if self.get_errno:
            raise OSError(self.get_errno, "injected")
        return [self.sockets.get(r.cookie) for r in records]

    def reread(self, records: list[SocketRecord]) -> list[SocketRecord | int | None]:
        # The kernel's contract: get_many's answers (one state-filtered dump).
        return self.get_many(records)

    def destroy_many(self, records: list[SocketRecord]) -> list[int]:
        out = []
        for rec in records:
            try:
                self.destroy(rec)
                out.append(0)
            except OSError as exc:
                out.append(exc.errno or 0)
        return out

    def dump(self, states: list[TcpState], keep: object = None) -> tuple[int, list[SocketRecord]]:
        found = [s for s in self.sockets.values() if s.state in states]
        if callable(keep):
            found = [s for s in found if keep(int(s.state), s.local.port, s.peer.port)]
        return len(found), found


@dataclass
class FakeConntrack:
    entries: dict[FlowTuple, ConntrackEntry] = field(default_factory=dict)
    update_errno: int | None = None

    def get_by_reply(self, reply: FlowTuple) -> ConntrackEntry | None:
        return self.entries.get(reply)

    def lookup_sockets(self, sockets: list[SocketRecord]) -> dict[int, ConntrackEntry | None]:
        return {s.cookie: self.entries.get(s.nat_reply_tuple) for s in sockets}

    lookup_sockets_get = lookup_sockets  # the kill's re-check (always GETs)

    def update(self, entry: ConntrackEntry, *, timeout: int | None = None) -> None:
        if self.update_errno:
            raise OSError(self.update_errno, "injected")
        assert timeout is not None
        self.entries[entry.reply] = ConntrackEntry(
            entry.original, entry.reply, entry.tcp_state, timeout, entry.status
        )


def kill(diag: FakeDiag, ct: FakeConntrack, **kw: object) -> list[tuple[Outcome, object]]:
    findings = [
        Finding(Kind.LEAKED, s, None, capture=Capture.RULE, min_silence_seconds=60.0)
        for s in list(diag.sockets.values())
    ]
    settings = ActionSettings(action=ActionKind.KILL, min_idle_seconds=0, **kw)  # type: ignore[arg-type]
    plan = make_plan(findings, PORTS, settings)
    ex = Executor(diag, ct, ExecSettings(upstream_wait_seconds=0.0))  # type: ignore[arg-type]
    return [(o.outcome, o.error or o.reason) for o in ex.remediate(plan).outcomes]


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (errno.EPERM, (Outcome.FAILED, "EPERM")),
        (errno.EOPNOTSUPP, (Outcome.FAILED, "EOPNOTSUPP")),
        (errno.ENOENT, (Outcome.SKIPPED, SkipReason.ALREADY_GONE)),
        (errno.ESTALE, (Outcome.SKIPPED, SkipReason.ALREADY_GONE)),
    ],
)
def test_destroy_errors(err: int, expected: tuple[Outcome, object]) -> None:
    diag = FakeDiag({1: record(40001, 1)}, destroy_errno=err)
    assert kill(diag, FakeConntrack()) == [expected]


def test_a_failed_recheck_never_kills() -> None:
    diag = FakeDiag({1: record(40001, 1)}, get_errno=errno.ENOBUFS)
    assert kill(diag, FakeConntrack()) == [(Outcome.FAILED, "ENOBUFS")]
    assert diag.destroyed == []


def test_dry_run_never_destroys() -> None:
    diag = FakeDiag({1: record(40001, 1), 2: record(40002, 2)})
    assert kill(diag, FakeConntrack(), dry_run=True) == [(Outcome.SKIPPED, SkipReason.DRY_RUN)] * 2
    assert diag.destroyed == []


def test_kills_with_the_cookie_of_the_reread_socket() -> None:
    diag = FakeDiag({7: record(40001, 7)})
    assert kill(diag, FakeConntrack()) == [(Outcome.KILLED, None)]
    assert diag.destroyed == [7]


def test_an_entry_that_came_back_stops_the_kill() -> None:
    rec = record(40001, 1)
    reply = rec.nat_reply_tuple
    entry = ConntrackEntry(reply, reply, "ESTABLISHED", 300)
    diag = FakeDiag({1: rec})
    assert kill(diag, FakeConntrack({reply: entry})) == [
        (Outcome.SKIPPED, SkipReason.ENTRY_REAPPEARED)
    ]
    assert diag.destroyed == []


def test_extend_failure_is_reported_with_its_errno() -> None:
    rec = record(40001, 1)
    reply = rec.nat_reply_tuple
    entry = ConntrackEntry(reply, reply, "CLOSE_WAIT", 30, status=0x1AE)
    ct = FakeConntrack({reply: entry}, update_errno=errno.EPERM)
    plan = make_plan(
        [Finding(Kind.AT_RISK, rec, None, entry)],
        PORTS,
        ActionSettings(action=ActionKind.EXTEND_CONNTRACK),
    )
    assert [d.op for d in plan.decisions] == [Op.EXTEND]
    (o,) = Executor(FakeDiag({1: rec}), ct).remediate(plan).outcomes  # type: ignore[arg-type]
    assert (o.outcome, o.error, o.timeout_before) == (Outcome.FAILED, "EPERM", 30)


def test_kill_summary_claims_no_proxy_where_no_upstream_was_watched() -> None:
    from halfclose.agent.core.outcome import KillSummary

    assert KillSummary().describe() == "killed nothing"
    # A plain server's sockets: nothing paired, no CLOSE_WAIT leg of the holder.
    alone = KillSummary(killed=3)
    assert "proxy" not in alone.describe() and alone.upstream_watched == 0
    assert "no CLOSE-WAIT upstream socket" in alone.describe()
    proxied = KillSummary(
        killed=3, paired=1, paired_closed=1, unpaired_closed=2, unpaired_candidates=5
    )
    assert proxied.upstream_watched == 3
    assert proxied.describe() == (
        "killed 3 leaked socket(s); the proxy closed 3 of its CLOSE-WAIT upstream "
        "socket(s) (3 watched)"
    )


def test_the_killed_connections_own_peers_are_no_upstream_legs() -> None:
    # A plain server in the pod with its client in the same netns: the client's
    # CLOSE_WAIT socket (same uid, off the capture ports) is the killed socket's
    # other end, not a proxy's upstream leg.
    server = record(40001, 1)
    client = SocketRecord(
        TcpState.CLOSE_WAIT, server.peer, server.local, cookie=2, inode=2, uid=1337
    )
    other = SocketRecord(
        TcpState.CLOSE_WAIT,
        Endpoint(ipaddress.ip_address("192.0.2.10"), 50000),
        Endpoint(ipaddress.ip_address("203.0.113.10"), 80),
        cookie=3,
        inode=3,
        uid=1337,
    )
    diag = FakeDiag({1: server, 2: client, 3: other})
    findings = [Finding(Kind.LEAKED, server, None, capture=Capture.RULE, min_silence_seconds=1.0)]
    plan = make_plan(findings, PORTS, ActionSettings(action=ActionKind.KILL, min_idle_seconds=0))
    ex = Executor(diag, FakeConntrack(), ExecSettings(upstream_wait_seconds=0.0))  # type: ignore[arg-type]
    kills = ex.remediate(plan).kills
    assert kills is not None
    assert kills.killed == 1 and kills.unpaired_candidates == 1  # `other` only
