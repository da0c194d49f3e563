"""One netlink receive buffer per thread, not per socket (issue 11: agent RSS).

The agent holds two netlink sockets per watched netns; a zero-filled 64 KiB buffer
each was 13.4 MiB of RSS at 110 netns.  Sharing one per thread is safe as long as a
datagram is decoded before the thread receives another: these pin that contract
(interleaved sockets on one thread), and that ``dump`` (which yields mid-datagram)
copies, so its iterators may be interleaved with other netlink I/O.
"""

from __future__ import annotations

import struct
import threading
import tracemalloc

from halfclose.agent.kernel import netlink as nl


class FakeSocket:
    """Hands out prepared datagrams to recv_into, as the kernel would."""

    def __init__(self, datagrams: list[bytes]) -> None:
        self.datagrams = list(datagrams)

    def setsockopt(self, *_: object) -> None:
        pass

    def bind(self, *_: object) -> None:
        pass

    def send(self, data: bytes) -> int:
        return len(data)

    def recv_into(self, buf: bytearray) -> int:
        datagram = self.datagrams.pop(0)
        buf[: len(datagram)] = datagram
        return len(datagram)

    def close(self) -> None:
        pass


def _msg(seq: int, payload: bytes, msg_type: int = 20) -> bytes:
    return nl.pack_message(msg_type, nl.NLM_F_MULTI, seq, payload)


def _dump_datagrams(seq: int, tag: bytes, n: int, per_datagram: int) -> list[bytes]:
    """``n`` messages whose payloads are ``tag`` + index, ``per_datagram`` a datagram,
    then NLMSG_DONE."""
    msgs = [_msg(seq, _payload(tag, i)) for i in range(n)]
    out = [b"".join(msgs[i : i + per_datagram]) for i in range(0, n, per_datagram)]
    out.append(_msg(seq, struct.pack("=i", 0), nl.NLMSG_DONE))
    return out


def _payload(tag: bytes, i: int) -> bytes:
    return tag.ljust(4, b"_") + struct.pack("=I", i)  # 8 bytes: messages stay aligned


def _socket(datagrams: list[bytes]) -> nl.NetlinkSocket:
    return nl.NetlinkSocket(FakeSocket(datagrams))  # type: ignore[arg-type]


def _payloads(datagram: memoryview) -> list[bytes]:
    return [bytes(m.payload) for m in nl.iter_messages(datagram) if m.type != nl.NLMSG_DONE]


def test_sockets_hold_no_buffer_of_their_own() -> None:
    nl.receive_buffer()  # this thread's buffer exists before we count
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        socks = [_socket([]) for _ in range(200)]
        grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
    assert len(socks) == 200
    # Per-socket 64 KiB buffers would be 12.5 MiB here.
    assert grown < 200 * 1024, f"{grown} bytes for 200 sockets"


def test_two_sockets_on_one_thread_share_the_buffer_and_each_parse_is_whole() -> None:
    a = _socket(_dump_datagrams(1, b"A", 6, 3))
    b = _socket(_dump_datagrams(1, b"B", 6, 3))
    seen_a: list[bytes] = []
    seen_b: list[bytes] = []
    for _ in range(2):  # alternate: a datagram of a, decoded; then one of b, decoded
        view_a = a.recv()
        seen_a += _payloads(view_a)
        view_b = b.recv()
        assert view_b.obj is view_a.obj  # the same (thread's) buffer
        seen_b += _payloads(view_b)
    assert seen_a == [_payload(b"A", i) for i in range(6)]
    assert seen_b == [_payload(b"B", i) for i in range(6)]


def test_dump_iterators_may_be_interleaved() -> None:
    """``dump`` yields in the middle of a datagram; another socket's recv on the same
    thread in between must not change what it yields next."""
    a = _socket(_dump_datagrams(1, b"A", 8, 4))
    b = _socket(_dump_datagrams(1, b"B", 8, 4))
    got_a, got_b = [], []
    for msg_a, msg_b in zip(a.dump(b"", 1), b.dump(b"", 1), strict=True):
        got_a.append(bytes(msg_a.payload))
        got_b.append(bytes(msg_b.payload))
    assert got_a == [_payload(b"A", i) for i in range(8)]
    assert got_b == [_payload(b"B", i) for i in range(8)]


def test_each_thread_has_its_own_buffer() -> None:
    mine = nl.receive_buffer()[0]
    theirs: list[bytearray] = []
    thread = threading.Thread(target=lambda: theirs.append(nl.receive_buffer()[0]))
    thread.start()
    thread.join()
    assert theirs and theirs[0] is not mine and len(mine) == nl.RECV_BUFFER
