"""Part 3's lookups answered by one dump give the GETs' answers, on a real kernel.

``Conntrack.lookup_sockets`` answers many lookups from one TCP dump of the
netns's table (issue 11) instead of one GET each.  A GET by tuple T finds the
zone-0 entry having T as its original *or* reply tuple; the dump path must give
exactly that answer, or a live connection reads as leaked.  One netns holds
every shape that matters (real sockets where the kernel makes them, the rest
inserted with ``conntrack -I``), and both paths, and ``lookup_sockets`` with its
threshold forced each way, must answer every socket the same, and as expected:

- a REDIRECT entry (reply tuple differs from the original), IPv4 socket;
- the same through a dual-stack listener: an IPv4-mapped IPv6 socket whose
  entry is IPv4;
- a plain IPv6 connection's entry, and an IPv6 REDIRECT's;
- the app's own socket, whose tuple is the REDIRECT entry's *original* tuple;
- TIME_WAIT and SYN_SENT (the app's new connection: a collision) entries;
- absent tuples, also on a port pair another socket's entry has; a tuple
  whose only entry is UDP; one whose entry lives in conntrack zone 5; one
  entry zoned in its original direction only (a zone-0 GET finds it by its
  reply tuple, not by its original one).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
from collections.abc import Iterator

import pytest

from halfclose.agent.core.model import ConntrackEntry, Endpoint, SocketRecord, TcpState
from halfclose.agent.kernel import conntrack as ctmod
from halfclose.agent.kernel.conntrack import Conntrack
from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.agent.kernel.sockdiag import SockDiag
from support.scratchnet import holder, run, scratch_netns, skip_unless_root

pytestmark = pytest.mark.kernel

SERVER = """
import socket
l4 = socket.socket(); l4.bind(("127.0.0.1", 15001)); l4.listen()
l6 = socket.socket(socket.AF_INET6)
l6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
l6.bind(("::", 15002)); l6.listen()
v6 = socket.socket(socket.AF_INET6); v6.bind(("2001:db8::1", 8080)); v6.listen()
r6 = socket.socket(socket.AF_INET6); r6.bind(("::", 8081)); r6.listen()
c1 = socket.create_connection(("203.0.113.10", 7777)); a1, _ = l4.accept()
c2 = socket.create_connection(("203.0.113.10", 7778)); a2, _ = l6.accept()
c3 = socket.create_connection(("2001:db8::1", 8080)); a3, _ = v6.accept()
c4 = socket.create_connection(("2001:db8::1", 7779)); a4, _ = r6.accept()
keep = [c1, a1, c2, a2, c3, a3, c4, a4]
"""


def record(sock: SocketRecord, local: str, lport: int, peer: str, pport: int) -> SocketRecord:
    """A socket record with another tuple (the lookup reads only the tuple and cookie)."""
    return dataclasses.replace(
        sock,
        local=Endpoint(ipaddress.ip_address(local), lport),
        peer=Endpoint(ipaddress.ip_address(peer), pport),
        cookie=next(_COOKIES),
    )


_COOKIES = itertools.count(1 << 62)


def insert(netns: str, *args: str) -> None:
    run("conntrack", "-I", *args, "--timeout", "120", netns=netns)


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[str, dict[str, SocketRecord]]]:
    skip_unless_root("iptables", "ip6tables", "conntrack")
    with scratch_netns("ctdump") as ns:
        run("ip", "addr", "add", "203.0.113.10/32", "dev", "lo", netns=ns)
        run("ip", "addr", "add", "2001:db8::1/128", "dev", "lo", "nodad", netns=ns)
        for dport, to in ((7777, 15001), (7778, 15002)):
            run(
                "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "203.0.113.10",
                "--dport", str(dport), "-j", "REDIRECT", "--to-ports", str(to),
                netns=ns,
            )  # fmt: skip
        run(
            "ip6tables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "2001:db8::1",
            "--dport", "7779", "-j", "REDIRECT", "--to-ports", "8081",
            netns=ns,
        )  # fmt: skip
        with holder(ns, SERVER), NetnsHandle.from_name(ns) as handle:
            diag = SockDiag.open(handle)
            try:
                _, socks = diag.dump([TcpState.ESTABLISHED])
            finally:
                diag.close()
            by_port = {(s.local.port, s.peer.port): s for s in socks}

            def one(lport: int | None = None, pport: int | None = None) -> SocketRecord:
                (s,) = [
                    s
                    for (lp, pp), s in by_port.items()
                    if (lport is None or lp == lport) and (pport is None or pp == pport)
                ]
                return s

            v4 = one(lport=15001)
            mapped = one(lport=15002)
            assert mapped.local.ip.version == 6 and mapped.peer.ip.ipv4_mapped is not None
            base = v4
            cases = {
                "redirect-v4": v4,
                "redirect-mapped": mapped,
                "v6": one(lport=8080),
                "redirect-v6": one(lport=8081),
                "app-side-original": one(pport=7777),
                "absent-v4": record(base, "127.0.0.1", 15001, "203.0.113.10", 1),
                "absent-mapped": record(base, "::ffff:127.0.0.1", 15002, "::ffff:203.0.113.10", 2),
                "absent-v6": record(base, "2001:db8::1", 8080, "2001:db8::1", 3),
                "time-wait": record(base, "127.0.0.1", 15001, "203.0.113.10", 40001),
                "syn-sent": record(base, "::ffff:127.0.0.1", 15002, "::ffff:203.0.113.10", 40002),
                "udp-only": record(base, "127.0.0.1", 15001, "203.0.113.10", 40003),
                "zone-5": record(base, "127.0.0.1", 15001, "203.0.113.10", 40004),
                "orig-zone-by-reply": record(base, "127.0.0.1", 15001, "203.0.113.10", 40005),
                "orig-zone-by-orig": record(base, "203.0.113.10", 40005, "203.0.113.10", 7777),
                # Port pairs shared between sockets (the dump path indexes by them first).
                "time-wait-other-peer": record(base, "127.0.0.1", 15001, "203.0.113.99", 40001),
                "time-wait-mapped": record(
                    base, "::ffff:127.0.0.1", 15001, "::ffff:203.0.113.10", 40001
                ),
            }
            for port, state, extra in (
                (40001, "TIME_WAIT", ()),
                (40002, "SYN_SENT", ()),
                (40004, "ESTABLISHED", ("--zone", "5")),
                (40005, "ESTABLISHED", ("--orig-zone", "7")),
            ):
                insert(
                    ns, "-p", "tcp", "-s", "203.0.113.10", "-d", "203.0.113.10",
                    "--sport", str(port), "--dport", "7777", "-r", "127.0.0.1",
                    "-q", "203.0.113.10", "--reply-port-src", "15001",
                    "--reply-port-dst", str(port), "--state", state, *extra,
                )  # fmt: skip
            insert(
                ns, "-p", "udp", "-s", "203.0.113.10", "-d", "203.0.113.10",
                "--sport", "40003", "--dport", "7777", "-r", "127.0.0.1",
                "-q", "203.0.113.10", "--reply-port-src", "15001", "--reply-port-dst", "40003",
            )  # fmt: skip
            yield ns, cases


def state(entry: ConntrackEntry | None) -> str | None:
    return None if entry is None else entry.tcp_state


EXPECTED = {
    "redirect-v4": "ESTABLISHED",
    "redirect-mapped": "ESTABLISHED",
    "v6": "ESTABLISHED",
    "redirect-v6": "ESTABLISHED",
    "app-side-original": "ESTABLISHED",
    "absent-v4": None,
    "absent-mapped": None,
    "absent-v6": None,
    "time-wait": "TIME_WAIT",
    "syn-sent": None,  # inserted under 15001's tuple; the mapped socket asks 15002's
    "udp-only": None,
    "zone-5": None,
    "orig-zone-by-reply": "ESTABLISHED",
    "orig-zone-by-orig": None,
    "time-wait-other-peer": None,
    "time-wait-mapped": "TIME_WAIT",
}


@pytest.mark.parametrize("only_ipv4", [False, True], ids=["every-family", "ipv4"])
@pytest.mark.parametrize("force_dump", [True, False], ids=["dump", "get"])
def test_dump_and_get_answer_every_lookup_alike(
    lab: tuple[str, dict[str, SocketRecord]],
    force_dump: bool,
    only_ipv4: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ns, cases = lab
    # The app's new connection from a reused port, under the (normalized)
    # reply tuple of a mapped socket: a collision entry (SYN_SENT).
    cases = dict(cases)
    cases["syn-sent"] = record(
        cases["syn-sent"], "::ffff:127.0.0.1", 15001, "::ffff:203.0.113.10", 40002
    )
    expected = dict(EXPECTED, **{"syn-sent": "SYN_SENT"})
    if only_ipv4:
        # All IPv4: the dump is one TCP-filtered IPv4 dump (not every family).
        cases = {n: s for n, s in cases.items() if s.local.ip.version == 4}
        cases["syn-sent"] = record(cases["redirect-v4"], "127.0.0.1", 15001, "203.0.113.10", 40002)
        expected = {n: expected[n] for n in cases}
        assert len(cases) == 10
    names = list(cases)
    socks = [cases[n] for n in names]
    monkeypatch.setattr(ctmod, "FORCE_DUMP", force_dump)
    with NetnsHandle.from_name(ns) as handle:
        ct = Conntrack.open(handle)
        try:
            dumped = ct.lookup_sockets_dump(socks)
            got = ct.lookup_sockets_get(socks)
            auto = ct.lookup_sockets(socks)
            # The oracle: the generic GET (FlowTuple, generic encoder and decoder).
            replies = ct.lookup_replies([s.nat_reply_tuple for s in socks])
        finally:
            ct.close()
    assert got == {s.cookie: replies[s.nat_reply_tuple] for s in socks}
    assert {n: state(got[cases[n].cookie]) for n in names} == expected
    assert dumped == got  # every field of every entry, and every absence
    assert auto == got
    redirect = got[cases["redirect-v4"].cookie]
    assert redirect is not None and redirect.dst_nat and redirect.original != redirect.reply


def test_threshold_picks_the_dump_only_for_many_lookups(
    lab: tuple[str, dict[str, SocketRecord]], monkeypatch: pytest.MonkeyPatch
) -> None:
    ns, cases = lab
    calls: list[str] = []
    real_dump, real_get = Conntrack.lookup_sockets_dump, Conntrack.lookup_sockets_get

    def spy_dump(self: Conntrack, socks: list[SocketRecord]) -> dict[int, ConntrackEntry | None]:
        calls.append("dump")
        return real_dump(self, socks)

    def spy_get(self: Conntrack, socks: list[SocketRecord]) -> dict[int, ConntrackEntry | None]:
        calls.append("get")
        return real_get(self, socks)

    monkeypatch.setattr(Conntrack, "lookup_sockets_dump", spy_dump)
    monkeypatch.setattr(Conntrack, "lookup_sockets_get", spy_get)
    socks = list(cases.values())
    n = len(socks)
    monkeypatch.setattr(ctmod, "DUMP_MIN_LOOKUPS", n)
    # Costs scaled so that this table's walk is worth n lookups' GETs.
    monkeypatch.setattr(ctmod, "GET_COST_US", 1.0)
    monkeypatch.setattr(ctmod, "DUMP_WALK_COST_US", n - 1.0)
    monkeypatch.setattr(ctmod, "DUMPED_ENTRY_COST_US", 1.0 / 64)
    with NetnsHandle.from_name(ns) as handle:
        ct = Conntrack.open(handle)
        try:
            assert 0 < ct.count() < 64  # this netns's table, not the host's
            ct.lookup_sockets(socks)  # worth a dump
            ct.lookup_sockets(socks[:-1])  # below DUMP_MIN_LOOKUPS
            # A table whose decoding would cost more than the GETs.
            monkeypatch.setattr(ctmod, "DUMPED_ENTRY_COST_US", 1.0)
            ct.lookup_sockets(socks)
        finally:
            ct.close()
    assert calls == ["dump", "get", "get"]


def test_dump_pays_by_count_and_table_size() -> None:
    walk, get = ctmod.DUMP_WALK_COST_US, ctmod.GET_COST_US
    assert not ctmod.dump_pays(ctmod.DUMP_MIN_LOOKUPS, 0)
    assert ctmod.dump_pays(20_000, 0)
    assert ctmod.dump_pays(int(walk / get) + 1, 0)
    assert not ctmod.dump_pays(20_000, 40_000)  # a busy table: decoding costs more
