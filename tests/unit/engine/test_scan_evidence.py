"""The scanner's rule-free capture evidence is kept like the rules, and re-read when short."""

from __future__ import annotations

import ipaddress
from typing import Any

from halfclose.agent.core.model import ConntrackEntry, Endpoint, FlowTuple, SocketRecord, TcpState
from halfclose.agent.engine.scan import Scanner

LO = ipaddress.ip_address("127.0.0.1")
APP = ipaddress.ip_address("192.0.2.10")


class FakeConntrack:
    def __init__(self) -> None:
        self.dumps = 0
        self.ports = [15001]

    def dst_nat_entries(self) -> list[ConntrackEntry]:
        self.dumps += 1
        return [
            ConntrackEntry(
                FlowTuple(APP, 40000 + p, ipaddress.ip_address("203.0.113.10"), 80),
                FlowTuple(LO, p, APP, 40000 + p),
                "ESTABLISHED",
                300,
                status=ConntrackEntry.IPS_DST_NAT,
            )
            for p in self.ports
        ]


def scanner(ct: FakeConntrack) -> Any:
    s: Any = object.__new__(Scanner)
    s._ct = ct
    s._nat_eps = None
    s._nat_eps_at = 0.0
    return s


def sock(port: int) -> SocketRecord:
    return SocketRecord(TcpState.FIN_WAIT2, Endpoint(LO, port), Endpoint(APP, 1), 1, 1, 0)


def test_kept_while_fresh_and_sufficient_reread_when_not() -> None:
    ct = FakeConntrack()
    s = scanner(ct)
    assert s._nat_endpoints(60.0) == {Endpoint(LO, 15001)}
    assert s._nat_endpoints(60.0, [sock(15001)]) == {Endpoint(LO, 15001)}
    assert ct.dumps == 1  # kept: it shows what is wanted
    ct.ports = [15001, 15006]
    assert Endpoint(LO, 15006) in s._nat_endpoints(60.0, [sock(15006)])
    assert ct.dumps == 2  # not shown by what was kept: read again
    s._nat_endpoints(0.0)
    assert ct.dumps == 3  # max age 0 (the CLI): every time
