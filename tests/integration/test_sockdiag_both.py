"""SockDiag.dump's one-walk dump of both families (TCPDIAG_GETSOCK) on the real kernel.

The same sockets as one SOCK_DIAG_BY_FAMILY dump per family, field by field
(bar the tcp_info ages, which move between two dumps), both families, a
timewait minisocket and listeners included; and a kernel that refuses the
request falls back to the per-family dumps instead of failing the scan.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

from halfclose.agent.core.model import SocketRecord, TcpState
from halfclose.agent.kernel import inetdiag, sockdiag
from halfclose.agent.kernel import netlink as nl
from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.agent.kernel.sockdiag import SockDiag
from support.scratchnet import holder, scratch_netns, skip_unless_root

pytestmark = pytest.mark.kernel

SOCKETS = r"""
import socket, time
out = []
for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    lst = socket.socket(fam)
    if fam == socket.AF_INET6:
        lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    lst.bind((host, 15001)); lst.listen(64)
    out.append(lst)
    for i in range(40):
        c = socket.create_connection((host, 15001)); a, _ = lst.accept()
        c.sendall(b"x" * (i + 1)); a.recv(64)
        a.shutdown(socket.SHUT_WR)          # FIN_WAIT2 / CLOSE_WAIT
        out += [c, a]
    c = socket.create_connection((host, 15001)); a, _ = lst.accept()
    a.close()                               # orphan FIN_WAIT2: a timewait minisocket
    out.append(c)
time.sleep(0.2)
"""

STATES = [TcpState.FIN_WAIT2, TcpState.CLOSE_WAIT, TcpState.LISTEN]


def _stable(records: list[SocketRecord]) -> dict[int, tuple[Any, ...]]:
    return {
        r.cookie if not r.orphan else hash((r.local, r.peer)): (
            r.state, r.local, r.peer, r.inode, r.uid, r.ifindex, r.bytes_acked,
            r.bytes_received, r.transparent, r.last_ack_recv_ms is None,
        )
        for r in records
    }  # fmt: skip


def _keep(state: int, sport: int, _dport: int) -> bool:
    return state != TcpState.LISTEN or sport == 15001


def test_one_dump_of_both_families_is_the_two_family_dumps() -> None:
    skip_unless_root("ip")
    with scratch_netns("both") as ns, holder(ns, SOCKETS), NetnsHandle.from_name(ns) as h:
        both = SockDiag.open(h)
        per_family = SockDiag.open(h)
        per_family._both = False
        try:
            seen, got = both.dump(STATES, _keep)
            seen_pf, want = per_family.dump(STATES, _keep)
        finally:
            both.close()
            per_family.close()
    assert both._both  # the kernel took the legacy request
    assert seen == seen_pf == len(want) == 2 * (1 + 80 + 2)
    assert _stable(got) == _stable(want)
    assert {r.local.ip.version for r in got} == {4, 6}
    assert sum(r.orphan for r in got) == 2


def test_a_kernel_refusing_the_legacy_dump_gets_one_dump_per_family(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sent as a message type sock_diag does not know (the kernel answers EINVAL), as
    on a kernel without it: the scan still gets every socket."""
    skip_unless_root("ip")

    def unknown_type(states: int, seq: int, *, with_info: bool = True) -> bytes:
        good = inetdiag.encode_dump_both(states, seq, with_info=with_info)
        return (
            nl.NLMSG_HDR.pack(len(good), 99, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, seq, 0) + good[16:]
        )

    monkeypatch.setattr(sockdiag, "encode_dump_both", unknown_type)
    with scratch_netns("nocompat") as ns, holder(ns, SOCKETS), NetnsHandle.from_name(ns) as h:
        diag = SockDiag.open(h)
        try:
            with pytest.raises(nl.NetlinkError) as exc:
                seq = diag._nl.next_seq()
                diag._nl.send(unknown_type(1 << TcpState.FIN_WAIT2, seq))
                inetdiag.parse_buffers(diag._nl.datagrams(), seq)
            assert exc.value.errno == errno.EINVAL
            seen, got = diag.dump(STATES, _keep)
            assert not diag._both
            seen_again, again = diag.dump(STATES, _keep)
        finally:
            diag.close()
    assert seen == seen_again == 2 * (1 + 80 + 2)
    assert _stable(got) == _stable(again)
    assert {r.local.ip.version for r in got} == {4, 6}
