"""The agent's collision glue without a kernel: NEW events, stale tuples, Event text."""

from __future__ import annotations

import ipaddress
from pathlib import Path

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
from halfclose.agent.daemon.loop import Agent
from halfclose.agent.daemon.metrics import AgentMetrics
from halfclose.agent.daemon.record import collision_text
from halfclose.agent.daemon.settings import AgentSettings
from halfclose.agent.daemon.watched import WatchedNetns
from halfclose.agent.kernel.ctevents import ConntrackEvent
from halfclose.agent.kube.fake import FakeReports, FakeWorld
from support.fakekernel import FakeKernel

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


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def agent(tmp: Path, clock: Clock, kernel: FakeKernel) -> Agent:
    settings = AgentSettings(node_name="n", state_dir=str(tmp))
    return Agent(
        settings,
        AgentMetrics(CollectorRegistry(), "n"),
        FakeWorld(),
        FakeReports(),
        kernel,
        clock=clock,
        wall=clock,
    )


def watched(kernel: FakeKernel) -> WatchedNetns:
    kernel.add("c", 4242)
    kernel.open_netns(4242, "/fake")
    return WatchedNetns(
        inode=4242, path="/fake", pods=[("shop", "web")], capture_ports=frozenset({15001})
    )


def new(port: int) -> ConntrackEvent:
    return ConntrackEvent(False, reply(port), "SYN_SENT", 120, created=True)


def test_a_new_entry_under_a_stale_reply_tuple_scans_at_once(tmp_path: Path) -> None:
    clock, kernel = Clock(), FakeKernel()
    a = agent(tmp_path, clock, kernel)
    w = watched(kernel)
    assert w.remember_stale([Finding(Kind.LEAKED, sock(51920), None)])
    assert w.stale_replies == {reply(51920)}
    kernel.netns[4242].events = [new(40000), new(40001)]  # other connections of a busy pod
    assert a.reconciler.on_events(w) == []
    kernel.netns[4242].events = [new(51920)]
    assert a.reconciler.on_events(w) == [(4242, 0.0)]  # no debounce: the app is hanging


def test_stale_tuples_follow_the_last_scan_and_new_events_stop_without_them() -> None:
    w = watched(FakeKernel())
    entry = ConntrackEntry(reply(3), reply(3), "CLOSE_WAIT", 30)
    assert w.remember_stale(
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
    assert not w.remember_stale([])  # NEW events are no longer worth watching
    assert w.stale_replies == frozenset()


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
