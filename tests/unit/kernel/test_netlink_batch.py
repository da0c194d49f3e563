"""Batched netlink requests (kernel/netlink.py transact*, sockdiag destroy_many).

A fake kernel answers what the real one does: every request is handled in order
within one send(); without NLM_F_ACK only failures are answered; the ACKed NOOP
barrier comes last.  What must hold: an unanswered destroy counts as done only
once the barrier arrived, a failure keeps its errno, answers to other sequence
numbers are ignored, and a receive-buffer overrun never reads as success.
"""

from __future__ import annotations

import errno
import ipaddress
import struct

import pytest

from halfclose.agent.core.model import Endpoint, SocketRecord, TcpState
from halfclose.agent.kernel import netlink as nl
from halfclose.agent.kernel.inetdiag import SOCK_DESTROY, encode_destroy
from halfclose.agent.kernel.sockdiag import SockDiag


def _error(seq: int, err: int) -> bytes:
    return nl.pack_message(nl.NLMSG_ERROR, 0, seq, struct.pack("=i", -err) + b"\0" * 16)


class FakeKernelSocket:
    """Answers SOCK_DESTROY by cookie: ``fail`` maps a cookie to an errno."""

    def __init__(self, fail: dict[int, int], *, stale_first: bool = False) -> None:
        self.fail = fail
        self.queue: list[bytes] = []
        self.sends = 0
        self.overrun = False
        if stale_first:
            self.queue.append(_error(999_999, errno.EPERM))  # a late answer to something else

    def send(self, data: bytes) -> int:
        self.sends += 1
        offset = 0
        while offset < len(data):
            length, msg_type, flags, seq, _pid = nl.NLMSG_HDR.unpack_from(data, offset)
            if msg_type == SOCK_DESTROY:
                lo, hi = struct.unpack_from("=II", data, offset + 16 + 8 + 36 + 4)
                err = self.fail.get(lo | hi << 32, 0)
                if err or flags & nl.NLM_F_ACK:
                    self.queue.append(_error(seq, err))
            elif msg_type == nl.NLMSG_NOOP and flags & nl.NLM_F_ACK:
                self.queue.append(_error(seq, 0))
            offset += (length + 3) & ~3
        return len(data)

    def recv_into(self, buf: bytearray) -> int:
        if self.overrun:
            raise OSError(errno.ENOBUFS, "No buffer space available")
        msg = self.queue.pop(0)
        buf[: len(msg)] = msg
        return len(msg)

    def getsockopt(self, *_: object) -> int:
        return 4 << 20


def _diag(sock: FakeKernelSocket) -> SockDiag:
    nls = nl.NetlinkSocket.__new__(nl.NetlinkSocket)
    nls.sock = sock  # type: ignore[assignment]
    nls._seq = 0
    nls._buf = bytearray(nl.RECV_BUFFER)
    nls._view = memoryview(nls._buf)
    diag = SockDiag.__new__(SockDiag)
    diag._nl = nls
    return diag


def _rec(cookie: int) -> SocketRecord:
    ip = ipaddress.ip_address("127.0.0.1")
    return SocketRecord(
        TcpState.FIN_WAIT2, Endpoint(ip, 15001), Endpoint(ip, 40000 + cookie), cookie, cookie, 0
    )


def test_quiet_destroys_report_only_failures_after_the_barrier() -> None:
    sock = FakeKernelSocket({2: errno.ENOENT, 4: errno.EPERM}, stale_first=True)
    errs = _diag(sock).destroy_many([_rec(c) for c in (1, 2, 3, 4, 5)])
    assert errs == [0, errno.ENOENT, 0, errno.EPERM, 0]
    assert sock.sends == 1  # five destroys and the barrier in one send()


def test_an_overrun_reads_outcomes_back_instead_of_assuming_success(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sock = FakeKernelSocket({})
    sock.overrun = True
    diag = _diag(sock)
    # Socket 2 is still there after the overrun: it must not read as destroyed.
    monkeypatch.setattr(diag, "reread", lambda recs: [None, recs[1], None])
    assert diag.destroy_many([_rec(1), _rec(2), _rec(3)]) == [0, errno.ENOBUFS, 0]


def test_acked_transact_collects_replies_per_request() -> None:
    sock = FakeKernelSocket({7: errno.ESTALE})
    nls = _diag(sock)._nl
    reqs = [(s, encode_destroy(_rec(c), s)) for s, c in ((1, 6), (2, 7))]
    answers = nls.transact(reqs)
    assert answers == {1: (0, []), 2: (errno.ESTALE, [])}
