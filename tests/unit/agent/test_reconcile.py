"""The agent's decisions without root: the delay queue, scheduling, the kill budget,
the sysctl lifecycle, typed error reasons, deferred verification and report
fingerprinting, driven through ``FakeKernel`` and the kube fake on a fake clock."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from halfclose.agent.core.model import (
    Capture,
    ConntrackEntry,
    Endpoint,
    Finding,
    FlowTuple,
    Kind,
    SocketRecord,
    TcpState,
    UnprovenReason,
)
from halfclose.agent.core.plan import Op, SkipReason
from halfclose.agent.daemon import schedule
from halfclose.agent.daemon.loop import Agent
from halfclose.agent.daemon.metrics import AgentMetrics
from halfclose.agent.daemon.queue import DelayQueue
from halfclose.agent.daemon.settings import AgentSettings
from halfclose.agent.engine.scan import ScanResult
from halfclose.agent.kube.fake import FakeReports, FakeWorld
from halfclose.errors import NetnsGone, PermissionDenied, RulesUnreadable
from support.fakekernel import FakeKernel

ip = ipaddress.ip_address
CID = "a" * 64
INODE = 4026532001


# -- the delay queue --------------------------------------------------------------------


def test_queue_keeps_the_earliest_time_of_a_key_and_hands_it_out_once() -> None:
    q: DelayQueue[str] = DelayQueue()
    q.add_after("a", 5.0, now=0.0)
    q.add_after("a", 1.0, now=0.0)  # earlier wins
    q.add_after("a", 9.0, now=0.0)  # later is ignored
    assert len(q) == 1 and q.next_due() == 1.0
    assert q.pop_due(0.5) == []
    assert q.pop_due(1.0) == ["a"]
    assert q.pop_due(100.0) == [] and q.next_due() is None


def test_queue_is_fair_a_key_requeued_for_now_goes_behind_earlier_ones() -> None:
    q: DelayQueue[str] = DelayQueue()
    for i, key in enumerate("abc"):
        q.add_after(key, 0.1 * i, now=0.0)
    (first,) = q.pop_due(1.0, limit=1)
    q.add_after(first, 0.0, now=1.0)  # "a" wants to run again at once
    assert q.pop_due(1.0) == ["b", "c", "a"]


def test_queue_forget_drops_a_key() -> None:
    q: DelayQueue[int] = DelayQueue()
    q.add_after(1, 0.0, now=0.0)
    q.forget(1)
    assert q.pop_due(10.0) == [] and 1 not in q


# -- scheduling ---------------------------------------------------------------------------


def sock(port: int, *, idle_ms: int = 120_000, cookie: int | None = None) -> SocketRecord:
    return SocketRecord(
        TcpState.FIN_WAIT2,
        Endpoint(ip("127.0.0.1"), 15001),
        Endpoint(ip("192.0.2.10"), port),
        cookie=cookie if cookie is not None else port,
        inode=port,
        uid=1337,
        last_data_recv_ms=idle_ms,
        last_ack_recv_ms=idle_ms,
        last_data_sent_ms=idle_ms,
    )


def reply(port: int) -> FlowTuple:
    return FlowTuple(ip("127.0.0.1"), 15001, ip("192.0.2.10"), port)


def leaked(port: int, **kw: Any) -> Finding:
    return Finding(
        Kind.LEAKED, sock(port, **kw), None, capture=Capture.RULE, min_silence_seconds=60
    )


def collision(port: int) -> Finding:
    entry = ConntrackEntry(reply(port), reply(port), "SYN_SENT", 118)
    return Finding(
        Kind.COLLISION,
        sock(port, idle_ms=1),
        None,
        entry,
        capture=Capture.RULE,
        min_silence_seconds=0,
    )


def at_risk(port: int, timeout: int) -> Finding:
    entry = ConntrackEntry(reply(port), reply(port), "CLOSE_WAIT", timeout)
    return Finding(Kind.AT_RISK, sock(port), None, entry, capture=Capture.RULE)


TIMING = schedule.Timing(interval=30.0, min_idle=60.0, kills=True)


def test_next_run_is_just_after_the_earliest_predicted_expiry() -> None:
    delay = schedule.next_delay([at_risk(1, 12), at_risk(2, 7)], TIMING)
    assert delay == pytest.approx(7 + schedule.EXPIRY_MARGIN)


def test_next_run_is_when_a_young_leak_comes_of_age_under_kill_only() -> None:
    young = leaked(1, idle_ms=45_000)
    assert schedule.next_delay([young], TIMING) == pytest.approx(15 + schedule.EXPIRY_MARGIN)
    report_only = schedule.Timing(interval=30.0, min_idle=60.0, kills=False)
    assert schedule.next_delay([young], report_only) == 30.0


def test_next_run_is_when_an_entry_removed_early_finding_completes_its_proof() -> None:
    f = Finding(
        Kind.UNPROVEN,
        sock(1, idle_ms=52_000),
        None,
        reason=UnprovenReason.ENTRY_REMOVED_EARLY,
        capture=Capture.RULE,
        min_silence_seconds=60.0,
    )
    assert schedule.next_delay([f], TIMING) == pytest.approx(8 + schedule.EXPIRY_MARGIN)


def test_expected_expiry_is_dated_by_the_silence_within_the_kernels_whole_seconds() -> None:
    """ctnetlink says "0 s left" for the whole last second; the silence since the
    packet that re-armed the timer dates the expiry inside it (else a leak's
    lifetime would start up to a second early)."""
    entry = ConntrackEntry(reply(1), reply(1), "CLOSE_WAIT", 0)

    def finding(silence_ms: int | None, timeout: int = 0) -> Finding:
        e = ConntrackEntry(entry.original, entry.reply, "CLOSE_WAIT", timeout)
        s = sock(1, idle_ms=silence_ms) if silence_ms is not None else sock(1)
        if silence_ms is None:
            s = SocketRecord(s.state, s.local, s.peer, s.cookie, s.inode, s.uid)
        return Finding(Kind.AT_RISK, s, None, e, capture=Capture.RULE, min_silence_seconds=2.2)

    # close_wait 2 s (bar 2.2 s), silent 1.3 s: 0.7 s left, inside [0, 1).
    assert schedule.expected_expiry(finding(1300)) == pytest.approx(0.7)
    # The kernel's bounds win over the estimate: never before "timeout", never past +1.
    assert schedule.expected_expiry(finding(2500)) == 0.0
    assert schedule.expected_expiry(finding(10, timeout=0)) == 1.0
    assert schedule.expected_expiry(finding(None, timeout=1)) == 1.0
    assert schedule.expected_expiry(leaked(1)) is None


def test_an_entry_a_retransmitted_fin_moved_on_still_dates_the_leak() -> None:
    """A second FIN of the proxy's (its ACK lost after conntrack saw it) moves the
    entry to LAST_ACK, the app's ACK to TIME_WAIT (120 s), though the app never
    closed: the leak forms when that timer runs out, and is judged then."""

    def moved(state: str, timeout: int) -> Finding:
        entry = ConntrackEntry(reply(1), reply(1), state, timeout)
        return Finding(
            Kind.AT_RISK, sock(1), None, entry, capture=Capture.RULE, min_silence_seconds=60.0
        )

    for state, timeout in (("TIME_WAIT", 117), ("LAST_ACK", 25)):
        f = moved(state, timeout)
        # The entry goes within [timeout, timeout + 1): no bar dates it inside that second.
        due = timeout + 1 + schedule.EXPIRY_MARGIN
        assert schedule.expiry_delay(f) == pytest.approx(due)
        assert schedule.expected_expiry(f) == timeout
        slow = schedule.Timing(interval=300.0, min_idle=60.0, kills=True)
        assert schedule.next_delay([f], slow) == pytest.approx(due)
    # An entry in a state that forms no leak when it ends (a live connection's) dates nothing.
    assert schedule.expiry_delay(moved("ESTABLISHED", 400)) is None


def test_next_run_defaults_to_the_interval_and_never_spins() -> None:
    assert schedule.next_delay([], TIMING) == 30.0
    assert schedule.next_delay([at_risk(1, 0)], TIMING) >= schedule.MIN_SCAN_SPACING


def test_backoff_doubles_and_is_capped() -> None:
    assert [schedule.backoff(n, 30.0) for n in (1, 2, 3, 4, 9)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert schedule.backoff(5, 2.0) == 2.0  # never later than the interval


# -- the reconcilers, through FakeKernel ------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"namespaces": ["shop"], "scanIntervalSeconds": 30}
    base.update(spec)
    return {
        "apiVersion": "halfclose.io/v1alpha1",
        "kind": "HalfClosePolicy",
        "metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": base,
    }


def pod(name: str = "web", cid: str = CID) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": "shop", "name": name, "uid": f"uid-{name}", "labels": {}},
        "spec": {"nodeName": "n", "containers": [{"name": "app"}]},
        "status": {
            "phase": "Running",
            "containerStatuses": [{"name": "app", "containerID": f"containerd://{cid}"}],
        },
    }


class Rig:
    def __init__(self, tmp: Path, **spec: Any) -> None:
        self.clock = Clock()
        self.kernel = FakeKernel()
        self.ns = self.kernel.add(CID, INODE)
        self.world = FakeWorld()
        self.reports = FakeReports()
        self.registry = CollectorRegistry()
        self.world.put_namespace("shop")
        self.world.put_pod(pod())
        self.world.put_policy(policy(**spec))
        self.agent = Agent(
            AgentSettings(node_name="n", state_dir=str(tmp)),
            AgentMetrics(self.registry, "n"),
            self.world,
            self.reports,
            self.kernel,
            clock=self.clock,
            wall=self.clock,
        )

    def scans(self, *results: ScanResult | BaseException) -> None:
        self.ns.results = list(results)

    def step(self, seconds: float = 0.0) -> None:
        self.clock.now += seconds
        self.agent.run_once(max_wait=0.0)

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def calls(self, what: str) -> int:
        return sum(1 for c, _ in self.kernel.calls if c == what)


def result(*findings: Finding) -> ScanResult:
    return ScanResult("/fake", (15001,), len(findings), 0.001, list(findings))


def test_a_matched_pod_is_opened_scanned_at_once_and_then_on_its_interval(tmp_path: Path) -> None:
    rig = Rig(tmp_path, action="Report")
    rig.step()
    assert rig.kernel.calls[:2] == [("open", INODE), ("scan", INODE)]
    assert rig.agent.queue.due_at(INODE) == pytest.approx(rig.clock.now + 30)
    rig.step(29.0)
    assert rig.calls("scan") == 1
    rig.step(1.0)
    assert rig.calls("scan") == 2


def test_kills_are_capped_by_the_node_budget_collisions_first(tmp_path: Path) -> None:
    rig = Rig(
        tmp_path, action="KillSockets", thresholds={"minIdleSeconds": 0, "maxKillsPerMinute": 2}
    )
    rig.scans(result(leaked(1, idle_ms=90_000), leaked(2, idle_ms=200_000), collision(3)))
    rig.step()
    ((_, plan),) = rig.kernel.plans
    killed = [d.finding.socket.local.port and d.finding.socket.peer.port for d in plan.kills]
    assert killed == [2, 3]  # the collision, then the longest idle leak
    over = [d for d in plan.decisions if d.reason is SkipReason.OVER_MAX_KILLS]
    assert [d.finding.socket.peer.port for d in over] == [1]
    assert rig.sample("halfclose_sockets_killed_total", namespace="shop", pod="web") == 2
    # The budget is spent: the next scan kills nothing until it refills.
    rig.step(0.5)
    rig.agent.queue.add_after(INODE, 0.0, rig.clock.now)
    rig.step()
    assert all(not p.kills for _, p in rig.kernel.plans[1:])


def test_upstream_verification_is_deferred_never_in_the_killing_pass(tmp_path: Path) -> None:
    rig = Rig(tmp_path, action="KillSockets", thresholds={"minIdleSeconds": 0})
    rig.scans(result(leaked(1)), result())
    rig.step()
    assert rig.calls("remediate") == 1 and rig.calls("verify") == 0
    due = rig.agent.queue.due_at(INODE)
    assert due is not None and due - rig.clock.now <= 0.1 + 1e-9  # comes back for it soon
    rig.step(0.1)
    assert rig.calls("verify") == 1
    assert rig.calls("scan") == 1  # the check is one dump, not another scan


def test_owners_are_looked_up_once_and_only_for_sockets_still_there(tmp_path: Path) -> None:
    rig = Rig(tmp_path, action="KillSockets", thresholds={"minIdleSeconds": 0})
    rig.scans(result(leaked(1), at_risk(2, 60)))
    rig.step()
    assert rig.calls("owners") == 1  # for the at-risk socket; the killed one needs none
    rig.scans(result(at_risk(2, 59)))
    rig.step(0.1)  # the upstream check
    rig.step(30.0)  # the interval
    assert rig.calls("scan") == 2 and rig.calls("owners") == 1  # cached by cookie


def test_a_late_destroy_of_an_entry_the_last_scan_saw_expired_is_no_new_scan(
    tmp_path: Path,
) -> None:
    from halfclose.agent.kernel.ctevents import ConntrackEvent

    rig = Rig(tmp_path, action="KillSockets", thresholds={"minIdleSeconds": 0})
    rig.scans(result(at_risk(1, 5)), result(leaked(1)))
    rig.step()
    rig.step(5.3)  # the scan after the predicted expiry: the leak is seen and killed
    assert rig.calls("scan") == 2
    (w,) = rig.agent.netns.values()
    late = ConntrackEvent(True, reply(1), "CLOSE_WAIT")  # the GC's DESTROY, late
    rig.ns.events = [late]
    assert rig.agent.reconciler.on_events(w) == []
    rig.ns.events = [ConntrackEvent(True, reply(9), "CLOSE_WAIT")]  # nobody predicted it
    assert rig.agent.reconciler.on_events(w) == [(INODE, 0.15)]


def test_report_only_scans_touch_no_socket_and_write_the_report_once(tmp_path: Path) -> None:
    rig = Rig(tmp_path, action="Report")
    rig.scans(result(leaked(1)))
    rig.step()
    assert rig.calls("remediate") == 0
    assert rig.reports.reports[("shop", "web")]["leaked"] == 1
    writes = rig.reports.writes
    rig.step(30.0)  # same findings: the fingerprint is unchanged, no rewrite
    assert rig.calls("scan") == 2 and rig.reports.writes == writes
    rig.scans(result(leaked(1), leaked(2)))
    rig.step(30.0)
    assert rig.reports.writes == writes + 1


def test_an_at_risk_entry_schedules_the_scan_just_after_its_expiry(tmp_path: Path) -> None:
    rig = Rig(tmp_path, action="KillSockets", thresholds={"minIdleSeconds": 0})
    rig.scans(result(at_risk(1, 7)))
    rig.step()
    assert rig.agent.queue.due_at(INODE) == pytest.approx(rig.clock.now + 7.05)


def test_the_sysctl_is_patched_once_and_restored_when_the_policy_goes(tmp_path: Path) -> None:
    rig = Rig(
        tmp_path,
        action="PatchConntrack",
        conntrack={"strategy": "Sysctl", "closeWaitTimeoutSeconds": 3600},
    )
    rig.step()
    rig.step(30.0)
    assert rig.calls("patch") == 1 and rig.kernel.netns[INODE].sysctl == 3600
    assert rig.sample("halfclose_conntrack_patched_pods") == 1
    assert any(e.reason == "ConntrackSysctlPatched" for e in rig.reports.events)
    rig.world.delete_policy("p")
    rig.agent.notify()
    rig.step()
    assert rig.kernel.netns[INODE].sysctl == 60 and rig.kernel.patched_inodes() == frozenset()
    assert ("close", INODE) in rig.kernel.calls


@pytest.mark.parametrize(
    ("error", "reason", "reresolves"),
    [
        (PermissionDenied("cannot enter netns: Operation not permitted"), "permission", False),
        (RulesUnreadable("cannot read NAT rules"), "rules_unreadable", False),
        (NetnsGone("netns went away"), "netns_gone", True),
    ],
)
def test_a_failed_scan_counts_its_own_reason_and_backs_off(
    tmp_path: Path, error: Exception, reason: str, reresolves: bool
) -> None:
    rig = Rig(tmp_path, action="Report")
    rig.scans(error)
    rig.step()
    assert rig.sample("halfclose_scan_errors_total", reason=reason) == 1
    assert rig.sample("halfclose_scan_errors_total", reason="netns_gone") == (
        1 if reresolves else 0
    )
    assert (("invalidate", 0) in rig.kernel.calls) is reresolves
    assert rig.agent.queue.due_at(INODE) == pytest.approx(rig.clock.now + 1.0)  # first backoff


def test_a_netns_that_cannot_be_entered_is_a_permission_failure(tmp_path: Path) -> None:
    rig = Rig(tmp_path, action="Report")
    rig.ns.open_error = PermissionDenied("cannot enter netns: Operation not permitted")
    rig.step()
    assert rig.sample("halfclose_scan_errors_total", reason="permission") == 1
    assert rig.sample("halfclose_scan_errors_total", reason="netns_gone") == 0
    assert rig.sample("halfclose_watched_netns") == 0


def test_dry_run_kills_nothing_and_spends_no_budget(tmp_path: Path) -> None:
    rig = Rig(
        tmp_path,
        action="KillSockets",
        dryRun=True,
        thresholds={"minIdleSeconds": 0, "maxKillsPerMinute": 1},
    )
    rig.scans(result(leaked(1)))
    rig.step()
    ((_, plan),) = rig.kernel.plans
    assert [d.op for d in plan.decisions] == [Op.KILL] and plan.settings.dry_run
    assert rig.sample("halfclose_sockets_killed_total", namespace="shop", pod="web") == 0
    bucket = rig.agent.pods.bucket
    assert bucket is not None and bucket.available(rig.clock.now) == 1


def test_a_bug_in_one_reconcile_is_counted_and_the_loop_goes_on(tmp_path: Path) -> None:
    rig = Rig(tmp_path, action="Report")
    rig.scans(result(leaked(1)))

    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("a bug")

    rig.agent.reconciler.recorder.record = broken  # type: ignore[method-assign]
    rig.step()
    assert rig.sample("halfclose_scan_errors_total", reason="internal") == 1
    assert rig.agent.queue.due_at(INODE) is not None  # still scheduled


# -- urgent before routine; the fast path (due sockets re-checked without a scan) ---------


def test_queue_hands_out_urgent_keys_before_routine_ones_due_earlier() -> None:
    q: DelayQueue[str] = DelayQueue()
    q.add_after("interval-scan", 0.0, now=0.0, routine=True)
    q.add_after("recheck", 0.5, now=0.0)
    assert q.pop_due(1.0) == ["recheck", "interval-scan"]


def test_queue_holds_routine_work_while_urgent_work_comes_due_within_the_guard() -> None:
    q: DelayQueue[str] = DelayQueue()
    q.add_after("scan", 0.0, now=0.0, routine=True)
    q.add_after("recheck", 1.1, now=0.0)
    assert q.pop_due(1.0, guard=0.2) == []  # a scan now would delay the re-check
    assert q.next_due(0.2, now=1.0) == pytest.approx(1.1)  # the loop sleeps until then
    assert q.pop_due(1.1, guard=0.2) == ["recheck", "scan"]
    # Never for long: a routine key that waited ROUTINE_MAX_WAIT goes anyway.
    q.add_after("scan", 0.0, now=0.0, routine=True)
    q.add_after("recheck", 6.1, now=0.0)
    assert q.pop_due(6.0, guard=0.2) == ["scan"]


def at_risk_silent(port: int, timeout: int, silence_ms: int, bar: float) -> Finding:
    entry = ConntrackEntry(reply(port), reply(port), "CLOSE_WAIT", timeout)
    return Finding(
        Kind.AT_RISK,
        sock(port, idle_ms=silence_ms),
        None,
        entry,
        capture=Capture.RULE,
        min_silence_seconds=bar,
    )


def test_under_kill_a_predicted_leak_is_rechecked_alone_and_killed_without_a_scan(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, action="KillSockets", thresholds={"minIdleSeconds": 0})
    rig.scans(result(at_risk_silent(1, 7, silence_ms=53_000, bar=60.2)))
    rig.step()
    assert rig.calls("scan") == 1
    rig.ns.rechecks = [result(leaked(1))]
    rig.step(7.3)  # the proof's time: expiry (7 s) and the bar (60.2 s of silence)
    assert rig.calls("scan") == 1 and rig.calls("recheck") == 1
    ((inode, asked),) = rig.kernel.rechecked
    assert inode == INODE and [s.cookie for s in asked] == [1]  # the scan's record
    assert rig.calls("remediate") == 1
    assert rig.sample("halfclose_sockets_killed_total", namespace="shop", pod="web") == 1
    assert rig.reports.reports[("shop", "web")]["killedTotal"] == 1


def test_when_only_a_scan_can_judge_the_recheck_becomes_a_scan_at_once(tmp_path: Path) -> None:
    rig = Rig(tmp_path, action="KillSockets", thresholds={"minIdleSeconds": 0})
    rig.scans(result(at_risk(1, 7)), result(leaked(1)))
    rig.step()
    rig.ns.rechecks = [None]  # e.g. the capture is shown by DST_NAT entries only
    rig.step(7.1)
    assert rig.calls("recheck") == 1 and rig.calls("scan") == 2
    assert rig.sample("halfclose_sockets_killed_total", namespace="shop", pod="web") == 1


def test_a_countdown_event_schedules_a_probe_by_tuple_not_a_scan(tmp_path: Path) -> None:
    from halfclose.agent.engine.recheck import NO_COOKIE
    from halfclose.agent.kernel.ctevents import ConntrackEvent

    rig = Rig(tmp_path, action="KillSockets", thresholds={"minIdleSeconds": 0})
    rig.step()
    (w,) = rig.agent.netns.values()
    scan_at = w.scan_at
    rig.ns.events = [ConntrackEvent(False, reply(5), "CLOSE_WAIT", timeout=2)]
    keys = rig.agent.reconciler.on_events(w)
    assert keys == [(INODE, schedule.countdown_delay(2))]
    assert w.scan_at == scan_at  # no scan for it
    for key, delay in keys:
        rig.agent.queue.add_after(key, delay, rig.clock.now)
    # The entry's DESTROY (reaped by the GC) is no reason to scan either.
    rig.ns.events = [ConntrackEvent(True, reply(5), "CLOSE_WAIT")]
    assert rig.agent.reconciler.on_events(w) == []
    rig.ns.rechecks = [result(leaked(5))]
    rig.step(schedule.countdown_delay(2))
    ((_, asked),) = rig.kernel.rechecked
    assert [(s.cookie, s.local.port, s.peer.port) for s in asked] == [(NO_COOKIE, 15001, 5)]
    assert rig.calls("scan") == 1 and rig.calls("remediate") == 1


def test_a_leak_the_recheck_leaves_alive_goes_to_a_scan_for_the_books(tmp_path: Path) -> None:
    rig = Rig(tmp_path, action="KillSockets", thresholds={"minIdleSeconds": 3600})
    rig.scans(result(at_risk(1, 7)), result(leaked(1)))
    rig.step()
    rig.ns.rechecks = [result(leaked(1))]  # too young to kill: the report must show it
    rig.step(7.1)
    assert rig.calls("remediate") == 0 or all(not p.kills for _, p in rig.kernel.plans)
    rig.step(0.0)
    assert rig.calls("scan") == 2
    assert rig.reports.reports[("shop", "web")]["leaked"] == 1


def test_report_only_never_rechecks(tmp_path: Path) -> None:
    rig = Rig(tmp_path, action="Report")
    rig.scans(result(at_risk(1, 7)))
    rig.step()
    rig.step(7.1)
    assert rig.calls("recheck") == 0 and rig.calls("scan") == 2
