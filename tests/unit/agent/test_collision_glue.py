"""The agent's collision glue without a kernel: NEW events, stale tuples, Event text."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from halfclose.agent.core.model import (
    ConntrackEntry,
    Endpoint,
    Finding,
    FlowTuple,
    Kind,
    SocketRecord,
    TcpState,
    UnprovenReason,
)
from halfclose.agent.daemon.hostnetns import PROC_NET_INIT_INO, host_netns_inodes
from halfclose.agent.daemon.loop import Agent, WatchedNetns, collision_text
from halfclose.agent.daemon.metrics import AgentMetrics
from halfclose.agent.daemon.settings import AgentSettings
from halfclose.agent.kernel.ctevents import ConntrackEvent
from halfclose.agent.kube.fake import FakeReports, FakeWorld

ip = ipaddress.ip_address


def sock(port: int, cookie: int = 1) -> SocketRecord:
    return SocketRecord(
        TcpState.FIN_WAIT2,
        Endpoint(ip("127.0.0.1"), 15001),
        Endpoint(ip("192.0.2.10"), port),
        cookie=cookie,
        inode=7,
        uid=1337,
    )


def reply(port: int) -> FlowTuple:
    return FlowTuple(ip("127.0.0.1"), 15001, ip("192.0.2.10"), port)


class FakeEvents:
    def __init__(self) -> None:
        self.queued: list[ConntrackEvent] = []
        self.watching: list[bool] = []

    def drain(self) -> tuple[list[ConntrackEvent], bool]:
        out, self.queued = self.queued, []
        return out, False

    def watch_new(self, on: bool) -> None:
        self.watching.append(on)

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def agent(tmp: Path, clock: Clock) -> Agent:
    settings = AgentSettings(node_name="n", state_dir=str(tmp))
    return Agent(
        settings,
        AgentMetrics(CollectorRegistry(), "n"),
        FakeWorld(),
        FakeReports(),
        remediator=Any,  # type: ignore[arg-type]  # never reached here
        clock=clock,
        wall=clock,
    )


def watched(events: FakeEvents) -> WatchedNetns:
    return WatchedNetns(
        inode=4242,
        handle=None,  # type: ignore[arg-type]
        scanner=None,  # type: ignore[arg-type]
        events=events,  # type: ignore[arg-type]
        pods=[("shop", "web")],
        next_scan=1000.0,
        capture_ports=frozenset({15001}),
    )


def new(port: int) -> ConntrackEvent:
    return ConntrackEvent(False, reply(port), "SYN_SENT", 120, created=True)


def test_a_new_entry_under_a_stale_reply_tuple_scans_at_once(tmp_path: Path) -> None:
    clock = Clock()
    a, events = agent(tmp_path, clock), FakeEvents()
    w = watched(events)
    w.remember_stale([Finding(Kind.LEAKED, sock(51920), None)])
    assert w.stale_replies == {reply(51920)} and events.watching == [True]
    events.queued = [new(40000), new(40001)]  # other connections of a busy pod
    a._on_events(w)
    assert w.trigger_at is None
    events.queued = [new(51920)]
    a._on_events(w)
    assert w.trigger_at == clock.now  # no debounce: the app is hanging


def test_stale_tuples_follow_the_last_scan_and_new_events_stop_without_them(
    tmp_path: Path,
) -> None:
    events = FakeEvents()
    w = watched(events)
    entry = ConntrackEntry(reply(3), reply(3), "CLOSE_WAIT", 30)
    w.remember_stale(
        [
            Finding(Kind.LEAKED, sock(1), None),
            Finding(Kind.COLLISION, sock(2), None),
            Finding(Kind.AT_RISK, sock(3), None, entry),
            Finding(Kind.UNPROVEN, sock(4), None, reason=UnprovenReason.ENTRY_REMOVED_EARLY),
            Finding(Kind.UNPROVEN, sock(5), None, reason=UnprovenReason.NOT_NAT_CAPTURED),
        ]
    )
    # Not the at-risk one: its live entry holds the tuple, no NEW entry can take it.
    assert w.stale_replies == {reply(1), reply(2), reply(4)}
    w.remember_stale([])
    assert w.stale_replies == frozenset()
    assert events.watching == [True, False]


def test_collision_text_names_the_stale_socket_and_the_blocked_connect() -> None:
    entry = ConntrackEntry(
        FlowTuple(ip("192.0.2.10"), 51920, ip("203.0.113.10"), 7777),
        reply(51920),
        "SYN_SENT",
        118,
    )
    assert collision_text(Finding(Kind.COLLISION, sock(51920), None, entry)) == (
        "127.0.0.1:15001<-192.0.2.10:51920 blocking a new connection from 192.0.2.10:51920 "
        "to 203.0.113.10:7777"
    )
    assert collision_text(Finding(Kind.COLLISION, sock(51920), None)) == (
        "127.0.0.1:15001<-192.0.2.10:51920 blocking a new connection from 192.0.2.10:51920"
    )


def test_the_host_netns_is_known_even_when_pid_1_is_unreadable(tmp_path: Path) -> None:
    assert host_netns_inodes(str(tmp_path)) == {PROC_NET_INIT_INO}  # no <proc>/1 here


def test_every_finding_kind_and_reason_fits_the_report_api() -> None:
    # report_finding() passes the core's values through: the API must accept them all.
    from typing import get_args

    from halfclose.api import report

    assert {k.value for k in Kind} <= set(get_args(report.FindingKind))
    assert {r.value for r in UnprovenReason} <= set(get_args(report.UnprovenReason))
