"""classify_paired (the scan's path) gives what pair(classify(...)) gives.

It builds each finding once instead of twice; the findings, their order and
their upstreams must be the same, and what it returns must be ordinary
(frozen) Findings.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random

import pytest

from halfclose.agent.core.classify import Evidence, classify, classify_paired
from halfclose.agent.core.model import (
    CaptureEvidence,
    ConntrackEntry,
    Endpoint,
    Finding,
    FlowTuple,
    HalfClosedTimeouts,
    Owner,
    SocketRecord,
    TcpState,
    UnprovenReason,
)
from halfclose.agent.core.pairing import pair

PORTS = frozenset({15001})
PROXY = ipaddress.ip_address("127.0.0.1")
APP = ipaddress.ip_address("192.0.2.10")
SERVICES = [Endpoint(ipaddress.ip_address("203.0.113.10"), p) for p in (7777, 443)]


def _world(
    rng: random.Random,
) -> tuple[list[SocketRecord], Evidence, dict[int, Owner], float]:
    spread = rng.choice([3, 10, 1000])
    sockets: list[SocketRecord] = []
    by_cookie: dict[int, ConntrackEntry | None] = {}
    owners: dict[int, Owner] = {}
    for k in range(rng.choice([1, 3, 8, 30, 80])):
        sent, got = rng.randrange(spread), rng.randrange(spread)
        t = rng.randrange(spread) * rng.choice([1, 15, 3000])
        age = rng.choice([None, 100, 5000, 60_000])
        down = SocketRecord(
            TcpState.FIN_WAIT2,
            Endpoint(PROXY, rng.choice([15001, 15001, 8080])),
            Endpoint(APP, 20000 + k),
            2 * k + 1,
            rng.choice([0, 2 * k + 1, 2 * k + 1]),
            1337,
            age,
            t,
            bytes_acked=sent + 1,
            bytes_received=got,
            last_data_sent_ms=age,
        )
        service = rng.choice(SERVICES)
        up = SocketRecord(
            TcpState.CLOSE_WAIT,
            Endpoint(APP, 40000 + k),
            service,
            2 * k + 2,
            2 * k + 2,
            1337,
            t,
            t + rng.choice([0, 3, 40]),
            bytes_acked=got + rng.choice([0, 1, 2]),
            bytes_received=sent + 1,
        )
        sockets += [down, up]
        for s in (down, up):
            if rng.random() < 0.5:
                owners[s.inode] = Owner(rng.choice([100, 200]), "envoy", s.inode)
        where = rng.random()
        if where < 0.2:
            original = FlowTuple(APP, 20000 + k, service.ip, service.port)
            state = rng.choice(["CLOSE_WAIT", "SYN_SENT"])
            by_cookie[down.cookie] = ConntrackEntry(original, down.nat_reply_tuple, state, 30)
        elif where < 0.9:
            by_cookie[down.cookie] = None
    rng.shuffle(sockets)
    timeouts = rng.choice([HalfClosedTimeouts(1, 120), HalfClosedTimeouts(60, 120), None])
    evidence = Evidence(
        CaptureEvidence(rule_ports=frozenset(rng.sample([15001, 8080], rng.choice([0, 1, 2])))),
        timeouts=timeouts,
        timeouts_missing=UnprovenReason.TIMEOUTS_UNKNOWN,
        by_cookie=by_cookie,
    )
    return sockets, evidence, owners, rng.choice([0.0, 0.0, 1.0, 10.0])


@pytest.mark.parametrize("seed", range(300))
def test_same_as_classify_then_pair(seed: int) -> None:
    sockets, evidence, owners, min_idle = _world(random.Random(seed))
    ports = frozenset({15001, 8080})
    want = pair(classify(sockets, ports, evidence, owners, min_idle), sockets, ports, owners)
    stages: list[str] = []
    got = classify_paired(
        sockets,
        ports,
        evidence,
        owners,
        min_idle,
        pool=sockets,
        capture_ports=ports,
        lap=stages.append,
    )
    assert got == want
    assert all(type(f) is Finding for f in got)
    assert stages == ["classify", "pairing"]
    if got:
        with pytest.raises(dataclasses.FrozenInstanceError):
            got[0].upstream = None  # type: ignore[misc]


def test_the_random_worlds_pair_some_and_leave_some() -> None:
    paired = unpaired = 0
    for seed in range(300):
        sockets, evidence, owners, min_idle = _world(random.Random(seed))
        ports = frozenset({15001, 8080})
        for f in classify_paired(
            sockets, ports, evidence, owners, min_idle, pool=sockets, capture_ports=ports
        ):
            paired += f.upstream is not None
            unpaired += f.upstream is None
    assert paired > 500 and unpaired > 500
