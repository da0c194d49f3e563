"""The batched kill path (agent/engine/kill.py) against in-memory kernel stand-ins.

The real kernel is in tests/integration/test_kill_batch.py.  Here errnos a
test cannot provoke are injected: every failure is reported with its errno
name, a failed re-check never turns into a kill, and the re-check's reasons
come through per socket even when the requests travel in one batch.
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
    Kind,
    Outcome,
    SocketRecord,
    TcpState,
)
from halfclose.agent.core.plan import ActionKind, ActionSettings, Decision, SkipReason, make_plan
from halfclose.agent.engine.kill import (
    KillResult,
    close_wait_baseline,
    kill,
    verify_upstreams,
)
from halfclose.agent.kernel.inetdiag import PortFilter

PORTS = frozenset({15001})
SILENT = 600_000


def record(
    port: int,
    cookie: int,
    state: TcpState = TcpState.FIN_WAIT2,
    *,
    local: int = 15001,
    silent_ms: int = SILENT,
) -> SocketRecord:
    return SocketRecord(
        state,
        Endpoint(ipaddress.ip_address("127.0.0.1"), local),
        Endpoint(ipaddress.ip_address("192.0.2.10"), port),
        cookie=cookie,
        inode=cookie,
        uid=1337,
        last_data_recv_ms=silent_ms,
        last_ack_recv_ms=silent_ms,
        last_data_sent_ms=silent_ms,
    )


@dataclass
class FakeDiag:
    """sock_diag by cookie: ``sockets`` is what the kernel holds."""

    sockets: dict[int, SocketRecord]
    get_errno: dict[int, int] = field(default_factory=dict)  # cookie -> errno
    destroy_errno: dict[int, int] = field(default_factory=dict)
    destroyed: list[int] = field(default_factory=list)
    sends: int = 0

    def get_many(self, recs: list[SocketRecord]) -> list[SocketRecord | int | None]:
        self.sends += 1
        return [self.get_errno.get(r.cookie) or self.sockets.get(r.cookie) for r in recs]

    def reread(self, recs: list[SocketRecord]) -> list[SocketRecord | int | None]:
        return self.get_many(recs)

    def destroy_many(self, recs: list[SocketRecord]) -> list[int]:
        self.sends += 1
        out = []
        for r in recs:
            err = self.destroy_errno.get(r.cookie, 0)
            if not err:
                self.destroyed.append(r.cookie)
                del self.sockets[r.cookie]
            out.append(err)
        return out

    def dump(
        self, states: list[TcpState], keep: PortFilter | None = None
    ) -> tuple[int, list[SocketRecord]]:
        found = [s for s in self.sockets.values() if s.state in states]
        if keep is not None:
            found = [s for s in found if keep(int(s.state), s.local.port, s.peer.port)]
        return len(found), found


@dataclass
class FakeConntrack:
    entries: dict[int, ConntrackEntry] = field(default_factory=dict)  # by socket cookie
    fail: int | None = None
    get_calls: int = 0

    def lookup_sockets(self, socks: list[SocketRecord]) -> dict[int, ConntrackEntry | None]:
        # The scan's lookup may answer from a dump (as old as its walk of the
        # whole hash); the kill's re-check must not.
        raise AssertionError("the kill re-checks the NAT entry by GET (lookup_sockets_get)")

    def lookup_sockets_get(self, socks: list[SocketRecord]) -> dict[int, ConntrackEntry | None]:
        self.get_calls += 1
        if self.fail:
            raise OSError(self.fail, "injected")
        return {s.cookie: self.entries.get(s.cookie) for s in socks}


def decisions(*socks: SocketRecord) -> list[Decision]:
    findings = [
        Finding(Kind.LEAKED, s, None, capture=Capture.RULE, min_silence_seconds=60.2) for s in socks
    ]
    plan = make_plan(
        findings,
        PORTS,
        ActionSettings(action=ActionKind.KILL, min_idle_seconds=0, max_kills=100_000),
    )
    return plan.kills


def run(diag: FakeDiag, ct: FakeConntrack, ds: list[Decision], **kw: object) -> list[KillResult]:
    return kill(diag, ct, ds, PORTS, **kw)  # type: ignore[arg-type]


def test_kills_many_in_few_sends_and_keeps_order() -> None:
    socks = [record(40000 + i, i + 1) for i in range(1200)]
    diag = FakeDiag({s.cookie: s for s in socks})
    ct = FakeConntrack()
    out = run(diag, ct, decisions(*socks), chunk=512)
    assert [r.outcome for r in out] == [Outcome.KILLED] * 1200
    assert diag.destroyed == [s.cookie for s in socks]
    assert diag.sends == 4  # one re-read for all, one destroy send per chunk
    assert ct.get_calls == 3  # the NAT entries by GET, per chunk, before its destroys


def test_each_socket_keeps_its_own_recheck_reason_inside_a_batch() -> None:
    ok = record(40001, 1)
    gone = record(40002, 2)
    changed = record(40003, 3)
    reappeared = record(40004, 4)
    talking = record(40005, 5)
    reused = record(40006, 6)
    now = {
        1: ok,
        3: record(40003, 3, TcpState.CLOSE_WAIT),
        4: reappeared,
        5: record(40005, 5, silent_ms=1000),  # a packet moved since the scan
        6: record(40006, 66),  # the tuple names another socket now
    }
    live = ConntrackEntry(reappeared.nat_reply_tuple, reappeared.nat_reply_tuple, "CLOSE_WAIT", 30)
    diag = FakeDiag(now)
    out = run(
        diag, FakeConntrack({4: live}), decisions(ok, gone, changed, reappeared, talking, reused)
    )
    assert [(r.outcome, r.reason) for r in out] == [
        (Outcome.KILLED, None),
        (Outcome.SKIPPED, SkipReason.ALREADY_GONE),
        (Outcome.SKIPPED, SkipReason.STATE_CHANGED),
        (Outcome.SKIPPED, SkipReason.ENTRY_REAPPEARED),
        (Outcome.SKIPPED, SkipReason.NOT_SILENT),
        (Outcome.SKIPPED, SkipReason.ALREADY_GONE),
    ]
    assert diag.destroyed == [1]


@pytest.mark.parametrize("err", [errno.EPERM, errno.ESTALE, errno.ENOBUFS])
def test_a_failed_reread_is_a_failure_never_a_kill(err: int) -> None:
    a, b = record(40001, 1), record(40002, 2)
    diag = FakeDiag({1: a, 2: b}, get_errno={1: err})
    out = run(diag, FakeConntrack(), decisions(a, b))
    assert out[0] == KillResult(Outcome.FAILED, error=errno.errorcode[err])
    assert out[1].outcome is Outcome.KILLED and diag.destroyed == [2]


def test_a_failed_conntrack_lookup_kills_nothing_in_its_chunk() -> None:
    a, b = record(40001, 1), record(40002, 2)
    diag = FakeDiag({1: a, 2: b})
    out = run(diag, FakeConntrack(fail=errno.EPERM), decisions(a, b))
    assert [r.error for r in out] == ["EPERM", "EPERM"] and diag.destroyed == []


def test_destroy_answers_map_to_outcomes() -> None:
    a, b, c = record(40001, 1), record(40002, 2), record(40003, 3)
    diag = FakeDiag({1: a, 2: b, 3: c}, destroy_errno={2: errno.ENOENT, 3: errno.EOPNOTSUPP})
    out = run(diag, FakeConntrack(), decisions(a, b, c))
    assert out == [
        KillResult(Outcome.KILLED),
        KillResult(Outcome.SKIPPED, SkipReason.ALREADY_GONE),
        KillResult(Outcome.FAILED, error="EOPNOTSUPP"),
    ]


def test_dry_run_rechecks_and_destroys_nothing() -> None:
    a = record(40001, 1)
    diag = FakeDiag({1: a})
    (r,) = run(diag, FakeConntrack(), decisions(a), dry_run=True)
    assert r == KillResult(Outcome.SKIPPED, SkipReason.DRY_RUN) and diag.destroyed == []


def test_upstream_legs_verified_later_by_one_dump() -> None:
    downs = [record(40001, 1), record(40002, 2), record(40003, 3)]
    legs = [
        record(7777, 11, TcpState.CLOSE_WAIT, local=50001),
        record(7777, 12, TcpState.CLOSE_WAIT, local=50002),
        record(7777, 13, TcpState.CLOSE_WAIT, local=50003),
    ]
    diag = FakeDiag({s.cookie: s for s in downs + legs})
    ds = decisions(*downs)
    baseline = close_wait_baseline(diag, ds, PORTS)  # type: ignore[arg-type]
    assert baseline == {11, 12, 13}
    run(diag, FakeConntrack(), ds)
    del diag.sockets[11], diag.sockets[13]  # the proxy closed two legs
    # Leg 11 was paired with a kill; the other two kills had no known leg.
    st = verify_upstreams(
        diag,  # type: ignore[arg-type]
        paired_legs=[legs[0]],
        unpaired_kills=2,
        uids=frozenset({1337}),
        baseline=baseline,
        capture_ports=PORTS,
    )
    assert st.closed == {11}
    assert (st.unpaired_closed, st.unpaired_candidates) == (1, 2)
