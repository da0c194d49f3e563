"""conntrack DESTROY events on the real kernel, from inside a private netns."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from halfclose.agent.kernel.ctevents import (
    ConntrackEvent,
    ConntrackEventSocket,
    leak_countdown,
    leak_forming,
)
from halfclose.agent.kernel.netlink import NETLINK_NETFILTER
from halfclose.agent.kernel.netns import NetnsHandle

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"hct-{secrets.token_hex(2)}-ctev"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        # A nat chain makes conntrack active in the netns (design.md §3).
        subprocess.run(
            ["ip", "netns", "exec", name, "nft", "-f", "-"],
            check=True,
            text=True,
            input="table ip nat { chain out { type nat hook output priority -100; }; }\n",
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def insert_entry(netns: str, app_port: int, state: str, timeout: int, proxy_port: int) -> None:
    """A REDIRECTed connection's entry: app:port -> 192.0.2.2:80, reply from proxy_port."""
    subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            netns,
            "conntrack",
            "-I",
            "-p",
            "tcp",
            "-s",
            "192.0.2.1",
            "-d",
            "192.0.2.2",
            "--sport",
            str(app_port),
            "--dport",
            "80",
            "-r",
            "127.0.0.1",
            "-q",
            "192.0.2.1",
            "--reply-port-src",
            str(proxy_port),
            "--reply-port-dst",
            str(app_port),
            "--state",
            state,
            "-t",
            str(timeout),
            "-u",
            "SEEN_REPLY",
        ],
        check=True,
        capture_output=True,
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
        sock = ConntrackEventSocket(
            handle.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        )
        with sock:
            assert sock.drain() == ([], False)  # non-blocking when idle
            insert_entry(netns, 40001, "CLOSE_WAIT", 1, proxy_port=15001)
            insert_entry(netns, 40002, "ESTABLISHED", 300, proxy_port=15001)
            # The kernel's GC worker is shared by every netns and paces itself by
            # the average timeout of all entries: measured here, an expired entry
            # can wait tens of seconds to be reaped (and announced).  A lookup
            # or dump reaps expired entries at once, as the agent's scans do.
            time.sleep(1.3)
            subprocess.run(
                ["ip", "netns", "exec", netns, "conntrack", "-L"], check=True, capture_output=True
            )
            # An explicit delete is a DESTROY too.
            subprocess.run(
                ["ip", "netns", "exec", netns, "conntrack", "-D", "-p", "tcp", "--sport", "40002"],
                check=True,
                capture_output=True,
            )
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
    other = f"hct-{secrets.token_hex(2)}-ctev2"
    subprocess.run(["ip", "netns", "add", other], check=True)
    try:
        subprocess.run(
            ["ip", "netns", "exec", other, "nft", "-f", "-"],
            check=True,
            text=True,
            input="table ip nat { chain out { type nat hook output priority -100; }; }\n",
        )
        with (
            NetnsHandle.from_name(netns) as handle,
            ConntrackEventSocket(
                handle.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            ) as sock,
        ):
            insert_entry(other, 40003, "ESTABLISHED", 300, proxy_port=15001)
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    other,
                    "conntrack",
                    "-D",
                    "-p",
                    "tcp",
                    "--sport",
                    "40003",
                ],
                check=True,
                capture_output=True,
            )
            insert_entry(netns, 40004, "ESTABLISHED", 300, proxy_port=15001)
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    netns,
                    "conntrack",
                    "-D",
                    "-p",
                    "tcp",
                    "--sport",
                    "40004",
                ],
                check=True,
                capture_output=True,
            )
            events = collect(sock, 1, timeout=5.0)
            time.sleep(0.2)
            events += [e for e in sock.drain()[0] if e.destroyed]
    finally:
        subprocess.run(["ip", "netns", "del", other], check=False)
    assert [e.reply.dport for e in events] == [40004]


def test_entering_close_wait_starts_the_countdown(netns: str) -> None:
    with (
        NetnsHandle.from_name(netns) as handle,
        ConntrackEventSocket(
            handle.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        ) as sock,
    ):
        insert_entry(netns, 40005, "ESTABLISHED", 300, proxy_port=15001)
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                netns,
                "conntrack",
                "-U",
                "-p",
                "tcp",
                "-s",
                "192.0.2.1",
                "-d",
                "192.0.2.2",
                "--sport",
                "40005",
                "--dport",
                "80",
                "--state",
                "CLOSE_WAIT",
                "-t",
                "42",
            ],
            check=True,
            capture_output=True,
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
