"""Minimal netlink framing: nlmsghdr, nlattr, and a request/response loop.

Only what sock_diag and ctnetlink need.  Parsing works on ``memoryview`` slices so
a large dump is walked without copying; callers decode payloads themselves with
``struct.unpack_from`` (docs/detection.md: a generic attribute decoder is the slow part).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLA_HDR = struct.Struct("=HH")  # len, type

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3

NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

NETLINK_SOCK_DIAG = 4
NETLINK_NETFILTER = 12

# One recv() never returns more than one dump skb, and the kernel sizes those
# at most ~32 KiB (netlink_recvmsg clamps max_recvmsg_len to
# SKB_WITH_OVERHEAD(32768)): a larger buffer only costs memory, so 64 KiB leaves
# headroom and no more.  Measured: scan times identical to a 1 MiB buffer at 10k
# and 25k sockets.  It is one buffer per *thread*, not per socket: the agent
# holds two sockets per watched netns, and 220 zero-filled 64 KiB buffers were
# 13.4 MiB of its RSS at 110 netns (issue 11).
RECV_BUFFER = 64 << 10
SOCKET_RCVBUF = 4 << 20

ERRNO = struct.Struct("=i")  # nlmsgerr.error, negative


class NetlinkError(OSError):
    """The kernel answered a request with a negative errno."""

    def __init__(self, err: int, what: str) -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")


@dataclass(frozen=True, slots=True)
class Message:
    """One netlink message: header fields and a view of its payload."""

    type: int
    flags: int
    seq: int
    payload: memoryview


def align4(n: int) -> int:
    return (n + 3) & ~3


def pack_message(msg_type: int, flags: int, seq: int, payload: bytes) -> bytes:
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(payload), msg_type, flags, seq, 0) + payload


def pack_attr(attr_type: int, value: bytes) -> bytes:
    length = NLA_HDR.size + len(value)
    return NLA_HDR.pack(length, attr_type) + value + b"\0" * (align4(length) - length)


def pack_nested(attr_type: int, *children: bytes) -> bytes:
    return pack_attr(attr_type | NLA_F_NESTED, b"".join(children))


def iter_messages(buf: memoryview) -> Iterator[Message]:
    """Walk the messages in one recv() buffer."""
    offset, end = 0, len(buf)
    unpack = NLMSG_HDR.unpack_from
    while offset + NLMSG_HDR.size <= end:
        length, msg_type, flags, seq, _pid = unpack(buf, offset)
        if length < NLMSG_HDR.size or offset + length > end:
            raise ValueError(f"truncated netlink message at offset {offset} (len {length})")
        yield Message(msg_type, flags, seq, buf[offset + NLMSG_HDR.size : offset + length])
        offset += (length + 3) & ~3


def iter_attrs(buf: memoryview, offset: int = 0) -> Iterator[tuple[int, memoryview]]:
    """Yield (type without flags, value view) for each nlattr from ``offset``."""
    end = len(buf)
    unpack = NLA_HDR.unpack_from
    while offset + NLA_HDR.size <= end:
        length, attr_type = unpack(buf, offset)
        if length < NLA_HDR.size or offset + length > end:
            raise ValueError(f"truncated netlink attribute at offset {offset} (len {length})")
        yield attr_type & NLA_TYPE_MASK, buf[offset + NLA_HDR.size : offset + length]
        offset += (length + 3) & ~3


def error_code(msg: Message) -> int:
    """The (positive) errno carried by an NLMSG_ERROR message; 0 is an ACK."""
    return -int(ERRNO.unpack_from(msg.payload, 0)[0])


class SocketFactory(Protocol):
    """What can create a socket inside a netns (``NetnsHandle``)."""

    def socket(self, family: int, type_: int, proto: int, /) -> socket.socket: ...


def open_socket(protocol: int, netns: SocketFactory | None = None) -> socket.socket:
    """A raw netlink socket of ``protocol``, created inside ``netns`` or here.

    Where it is created is where it talks, for its whole life (docs/detection.md).
    """
    args = (socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    return socket.socket(*args) if netns is None else netns.socket(*args)


_thread = threading.local()


def receive_buffer() -> tuple[bytearray, memoryview]:
    """The calling thread's receive buffer and a view of all of it.

    Every ``NetlinkSocket`` used on a thread receives into the same one, so a
    view of a datagram is valid until that thread's next recv on *any* netlink
    socket: decode a datagram (or copy what you keep) before receiving another,
    and never hold a datagram's view across another socket's I/O (``dump``
    copies its datagrams, so its iterator may be interleaved freely).
    """
    pair: tuple[bytearray, memoryview] | None = getattr(_thread, "buffer", None)
    if pair is None:
        buf = bytearray(RECV_BUFFER)
        pair = _thread.buffer = (buf, memoryview(buf))
    return pair


class NetlinkSocket:
    """A raw netlink socket with sequence numbers (its thread's receive buffer).

    The socket must be created in the target netns (see ``NetnsHandle.socket``):
    a netlink socket talks to the netns it was created in, whatever thread uses
    it later (docs/detection.md).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        try:
            # Root may exceed rmem_max; a dump must not overflow (ENOBUFS).
            sock.setsockopt(socket.SOL_SOCKET, 33, SOCKET_RCVBUF)  # SO_RCVBUFFORCE
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_RCVBUF)
        sock.bind((0, 0))
        self._seq = 0

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def recv(self) -> memoryview:
        """One datagram's worth of messages (a view valid until this thread's
        next recv on any netlink socket: ``receive_buffer``)."""
        buf, view = receive_buffer()
        n = self.sock.recv_into(buf)
        return view[:n]

    def datagrams(self) -> Iterator[memoryview]:
        """Received datagrams, each a view valid until the next one is read
        (on this thread, by any netlink socket).

        Endless: the caller walks the messages itself and stops at its
        NLMSG_DONE (``inetdiag.parse_buffers``), so no ``Message`` is built
        per item of a large dump.
        """
        while True:
            yield self.recv()

    def dump(self, request: bytes, seq: int) -> Iterator[Message]:
        """Send a dump request and yield its messages until NLMSG_DONE.

        Each datagram is copied out of the thread's receive buffer first, so a
        caller may do other netlink I/O between items (no hot path dumps this
        way: the scan's dumps parse the buffer in place).
        """
        self.send(request)
        while True:
            for msg in iter_messages(memoryview(bytes(self.recv()))):
                if msg.seq != seq:
                    continue  # a stale reply to an earlier, abandoned request
                if msg.type == NLMSG_DONE:
                    return
                if msg.type == NLMSG_ERROR:
                    err = error_code(msg)
                    if err:
                        raise NetlinkError(err, "netlink dump")
                    return
                yield msg

    def request(self, request: bytes, seq: int) -> list[Message]:
        """Send one request with NLM_F_ACK semantics and collect replies up to the ACK."""
        self.send(request)
        out: list[Message] = []
        while True:
            for msg in iter_messages(self.recv()):
                if msg.seq != seq:
                    continue
                if msg.type == NLMSG_ERROR:
                    err = error_code(msg)
                    if err:
                        raise NetlinkError(err, "netlink request")
                    return out
                if msg.type == NLMSG_DONE:
                    return out
                # Copy: the buffer is reused by the next recv.
                out.append(Message(msg.type, msg.flags, msg.seq, memoryview(bytes(msg.payload))))

    def batch_size(self, reply_bytes: int = 4096) -> int:
        """How many ACKed requests may go out in one send() without overrunning
        the receive buffer (an overrun drops answers: ENOBUFS).  ``reply_bytes``
        is what one request's answers cost the buffer, kernel overhead included."""
        rcvbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        return max(1, min(512, rcvbuf // reply_bytes))

    def transact(self, requests: Sequence[tuple[int, bytes]]) -> dict[int, tuple[int, list[bytes]]]:
        """Send many NLM_F_ACK requests in one send(); seq -> (errno, replies).

        Every request must carry NLM_F_ACK, so each is answered with zero or
        more messages and then exactly one NLMSG_ERROR (0 = done); or, for
        ``transact_quiet``, only the last one, which ends the wait.  Replies are
        copied (the receive buffer is reused).  Answers to other sequence
        numbers (late ones of an abandoned request) are skipped.
        """
        pending: dict[int, list[bytes]] = {seq: [] for seq, _ in requests}
        last = requests[-1][0] if requests else None
        out: dict[int, tuple[int, list[bytes]]] = {}
        self.send(b"".join(data for _, data in requests))
        unpack = NLMSG_HDR.unpack_from
        hdr = NLMSG_HDR.size
        while pending:
            buf = self.recv()
            offset, size = 0, len(buf)
            while offset + hdr <= size:
                length, msg_type, _flags, seq, _pid = unpack(buf, offset)
                if length < hdr or offset + length > size:
                    raise ValueError(f"truncated netlink message at offset {offset}")
                replies = pending.get(seq)
                if replies is not None:
                    if msg_type == NLMSG_ERROR:
                        err = -ERRNO.unpack_from(buf, offset + hdr)[0]
                        out[seq] = (err, replies)
                        del pending[seq]
                        if seq == last and not err:
                            # The final ACK: the kernel handled every request
                            # before it, so those still pending got no answer.
                            pending.clear()
                    elif msg_type != NLMSG_DONE:
                        replies.append(bytes(buf[offset + hdr : offset + length]))
                offset += (length + 3) & ~3
        return out

    def transact_quiet(self, requests: Sequence[tuple[int, bytes]]) -> dict[int, int]:
        """Send requests *without* NLM_F_ACK, then a NOOP barrier with one; seq -> errno.

        Without the flag the kernel answers a request only when it fails, so
        an absent answer is a success, once the barrier's ACK (processed after
        every request of the same send) has arrived.  An overrun of the
        receive buffer drops answers: recv raises ENOBUFS, and the caller must
        then find out what happened another way.
        """
        barrier = self.next_seq()
        noop = pack_message(NLMSG_NOOP, NLM_F_REQUEST | NLM_F_ACK, barrier, b"")
        answers = self.transact([*requests, (barrier, noop)])
        return {seq: err for seq, (err, _) in answers.items() if seq != barrier and err}

    def close(self) -> None:
        self.sock.close()


__all__ = [
    "NETLINK_NETFILTER",
    "NETLINK_SOCK_DIAG",
    "Message",
    "NetlinkError",
    "NetlinkSocket",
]
