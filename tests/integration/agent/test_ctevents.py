"""conntrack DESTROY events on the real kernel, from inside a private netns."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from collections.abc import Iterator

import pytest

from halfclose.agent.kernel.ctevents import (
    ConntrackEvent,
    ConntrackEventSocket,
    collision_forming,
    leak_countdown,
    leak_forming,
)
from halfclose.agent.kernel.netlink import NETLINK_NETFILTER, open_socket
from halfclose.agent.kernel.netns import NetnsHandle

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]


@contextlib.contextmanager
def nat_netns(tag: str) -> Iterator[str]:
    """A fresh netns where conntrack is active (a nat chain needs it, design.md §3)."""
    name = f"hct-{secrets.token_hex(2)}-{tag}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(
            ["ip", "netns", "exec", name, "nft", "-f", "-"],
            check=True,
            text=True,
            input="table ip nat { chain out { type nat hook output priority -100; }; }\n",
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def netns() -> Iterator[str]:
    with nat_netns("ctev") as name:
        yield name


def conntrack(netns: str, *args: str) -> None:
    """The conntrack CLI inside ``netns``: an independent way to make events."""
    subprocess.run(
        ["ip", "netns", "exec", netns, "conntrack", *args], check=True, capture_output=True
    )


def events_in(handle: NetnsHandle) -> ConntrackEventSocket:
    return ConntrackEventSocket(open_socket(NETLINK_NETFILTER, handle))


def insert_entry(netns: str, app_port: int, state: str, timeout: int, proxy_port: int) -> None:
    """A REDIRECTed connection's entry: app:port -> 192.0.2.2:80, reply from proxy_port."""
    conntrack(
        netns,
        *("-I", "-p", "tcp", "-s", "192.0.2.1", "-d", "192.0.2.2"),
        *("--sport", str(app_port), "--dport", "80", "-r", "127.0.0.1", "-q", "192.0.2.1"),
        *("--reply-port-src", str(proxy_port), "--reply-port-dst", str(app_port)),
        *("--state", state, "-t", str(timeout), "-u", "SEEN_REPLY"),
    )


def collect(sock: ConntrackEventSocket, want: int, timeout: float) -> list[ConntrackEvent]:
    got: list[ConntrackEvent] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        events, _ = sock.drain()
        got.extend(e for e in events if e.destroyed)
        time.sleep(0.05)
    return got


def test_destroy_events_carry_reply_tuple_and_state(netns: str) -> None:
    with NetnsHandle.from_name(netns) as handle:
        sock = events_in(handle)
        with sock:
            assert sock.drain() == ([], False)  # non-blocking when idle
            insert_entry(netns, 40001, "CLOSE_WAIT", 1, proxy_port=15001)
            insert_entry(netns, 40002, "ESTABLISHED", 300, proxy_port=15001)
            # The kernel's GC worker is shared by every netns and paces itself by
            # the average timeout of all entries: measured here, an expired entry
            # can wait tens of seconds to be reaped (and announced).  A lookup
            # or dump reaps expired entries at once, as the agent's scans do.
            time.sleep(1.3)
            conntrack(netns, "-L")
            # An explicit delete is a DESTROY too.
            conntrack(netns, "-D", "-p", "tcp", "--sport", "40002")
            events = collect(sock, 2, timeout=5.0)
    by_port = {e.reply.dport: e for e in events}
    assert set(by_port) == {40001, 40002}
    expired = by_port[40001]
    assert (str(expired.reply.src), expired.reply.sport) == ("127.0.0.1", 15001)
    assert str(expired.reply.dst) == "192.0.2.1"
    assert expired.tcp_state == "CLOSE_WAIT"
    assert leak_forming(expired, frozenset({15001}))
    assert not leak_forming(expired, frozenset({15006}))  # not a capture port
    assert by_port[40002].tcp_state == "ESTABLISHED"
    assert not leak_forming(by_port[40002], frozenset({15001}))  # a normal teardown


def test_events_of_other_netns_are_not_seen(netns: str) -> None:
    with (
        nat_netns("ctev2") as other,
        NetnsHandle.from_name(netns) as handle,
        events_in(handle) as sock,
    ):
        insert_entry(other, 40003, "ESTABLISHED", 300, proxy_port=15001)
        conntrack(other, "-D", "-p", "tcp", "--sport", "40003")
        insert_entry(netns, 40004, "ESTABLISHED", 300, proxy_port=15001)
        conntrack(netns, "-D", "-p", "tcp", "--sport", "40004")
        events = collect(sock, 1, timeout=5.0)
        time.sleep(0.2)
        events += [e for e in sock.drain()[0] if e.destroyed]
    assert [e.reply.dport for e in events] == [40004]


def test_entering_close_wait_starts_the_countdown(netns: str) -> None:
    with NetnsHandle.from_name(netns) as handle, events_in(handle) as sock:
        insert_entry(netns, 40005, "ESTABLISHED", 300, proxy_port=15001)
        conntrack(
            netns,
            *("-U", "-p", "tcp", "-s", "192.0.2.1", "-d", "192.0.2.2"),
            *("--sport", "40005", "--dport", "80", "--state", "CLOSE_WAIT", "-t", "42"),
        )
        updates: list[ConntrackEvent] = []
        deadline = time.monotonic() + 5.0
        while not updates and time.monotonic() < deadline:
            updates = [
                e for e in sock.drain()[0] if not e.destroyed and e.tcp_state == "CLOSE_WAIT"
            ]
            time.sleep(0.05)
    assert updates, "no UPDATE event for the entry entering CLOSE_WAIT"
    event = updates[0]
    assert event.reply.dport == 40005
    countdown = leak_countdown(event, frozenset({15001}))
    assert countdown is not None and 40 <= countdown <= 42
    assert leak_countdown(event, frozenset({4143})) is None
    assert not leak_forming(event, frozenset({15001}))  # an update is not a destroy


def test_new_events_come_only_while_watched_and_match_stale_tuples(netns: str) -> None:
    """NEW events (a collision's SYN_SENT entry) arrive only between watch_new(True/False)."""

    def created(sock: ConntrackEventSocket, timeout: float) -> list[ConntrackEvent]:
        got: list[ConntrackEvent] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got += [e for e in sock.drain()[0] if e.created]
            time.sleep(0.05)
        return got

    with NetnsHandle.from_name(netns) as handle, events_in(handle) as sock:
        insert_entry(netns, 40006, "SYN_SENT", 120, proxy_port=15001)
        assert created(sock, 0.3) == []  # not subscribed: a busy pod costs nothing
        sock.watch_new(True)
        sock.watch_new(True)  # idempotent
        insert_entry(netns, 40007, "SYN_SENT", 120, proxy_port=15001)
        seen = created(sock, 0.5)
        sock.watch_new(False)
        insert_entry(netns, 40008, "SYN_SENT", 120, proxy_port=15001)
        after = created(sock, 0.3)
    assert [e.reply.dport for e in seen] == [40007]
    (event,) = seen
    assert not event.destroyed and event.tcp_state == "SYN_SENT"
    assert (str(event.reply.src), event.reply.sport) == ("127.0.0.1", 15001)
    assert collision_forming(event, {event.reply})
    assert not collision_forming(event, set())
    assert not leak_forming(event, frozenset({15001}))
    assert leak_countdown(event, frozenset({15001})) is None
    assert after == []
