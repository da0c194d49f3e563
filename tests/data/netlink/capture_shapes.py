"""Regenerate ``sockdiag_shapes.json.gz`` (root, real kernel): dumps for the decoder's fast path.

    sudo .venv/bin/python tests/data/netlink/capture_shapes.py

``inetdiag.parse_buffers`` decodes same-shaped messages by a learned layout
and a datagram made only of them in one go (``inetdiag._Shape``); its tests
compare that with the generic walker on these dumps.  They need what the
small captures of capture.py lack: datagrams *full* of one shape (a dump
datagram holds ~80 sockets), and such runs broken by another shape.  In a
scratch netns, per family (127.0.0.1 and ::1):

- 100 half-closed pairs on :15001 (proxy side FIN_WAIT2 after
  ``shutdown(SHUT_WR)``, client side CLOSE_WAIT), each with its own byte
  counts: the scanner's state filter then returns ~2.5 datagrams of them;
- one orphaned FIN_WAIT2 (``close()``, not shutdown): a timewait minisocket,
  shorter, without tcp_info, somewhere among them (hash order);
- the same netns dumped for all states too (listeners first, IPv6 ones
  with INET_DIAG_SKV6ONLY);
- at the end, both families by one legacy TCPDIAG_GETSOCK dump (what
  ``SockDiag.dump`` sends): replies of type 18, the families interleaved.

The file holds the datagrams as hex, the request's sequence number, and each
socket as recorded from the socket objects (getsockname, fstat inode,
SO_COOKIE, TCP_INFO), not by the parser under test.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scratchns
from capture import describe, nlmsg, recv_all

HERE = Path(__file__).resolve().parent
PAIRS = 100
HALF_CLOSED = (1 << 5) | (1 << 8)  # FIN_WAIT2 | CLOSE_WAIT, as the scanner asks
ALL = 0xFFFFFFFF


def dump(family: int, states: int, seq: int) -> list[str]:
    """SOCK_DIAG_BY_FAMILY (inet_diag_req_v2), or with AF_UNSPEC TCPDIAG_GETSOCK (inet_diag_req)."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4)
    s.bind((0, 0))
    sockid = struct.pack("!HH16s16s", 0, 0, b"\0" * 16, b"\0" * 16)
    sockid += struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)
    if family == socket.AF_UNSPEC:
        req = struct.pack("=BBBB", 0, 0, 0, 1 << 1) + sockid + struct.pack("=II", states, 0)
        s.send(nlmsg(18, 0x1 | 0x300, seq, req))
    else:
        req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 1 << 1, 0, states) + sockid
        s.send(nlmsg(20, 0x1 | 0x300, seq, req))
    try:
        return [d.hex() for d in recv_all(s, seq, until_done=True)]
    finally:
        s.close()


def fill(buf: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        got += len(buf.recv(65536))


def inside() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    time.sleep(0.3)
    keep: list[socket.socket] = []
    sockets: list[dict[str, object]] = []
    dumps: dict[str, object] = {}
    for key, fam, host in (("v4", socket.AF_INET, "127.0.0.1"), ("v6", socket.AF_INET6, "::1")):
        lst = socket.socket(fam)
        if fam == socket.AF_INET6:
            lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        lst.bind((host, 15001))
        lst.listen(PAIRS + 8)
        keep.append(lst)
        pairs = []
        for i in range(PAIRS):
            c = socket.create_connection((host, 15001))
            a, _ = lst.accept()
            c.sendall(b"c" * (1 + i % 7))
            a.sendall(b"a" * (1 + i % 11))
            fill(a, 1 + i % 7)
            fill(c, 1 + i % 11)
            a.shutdown(socket.SHUT_WR)  # the proxy half-closes: FIN_WAIT2 / CLOSE_WAIT
            keep += [c, a]
            pairs.append((c, a))
        c2 = socket.create_connection((host, 15001))
        a2, _ = lst.accept()
        orphan = (a2.getsockname(), c2.getsockname())
        a2.close()  # orphaned FIN_WAIT2: a timewait minisocket
        keep.append(c2)
        time.sleep(0.3)
        dumps[key] = {
            "half_closed": {"seq": 7, "datagrams": dump(fam, HALF_CLOSED, 7)},
            "all": {"seq": 8, "datagrams": dump(fam, ALL, 8)},
        }
        fmt = "[{}]:{}" if fam == socket.AF_INET6 else "{}:{}"
        for c, a in pairs:
            sockets.append(describe(a, "FIN_WAIT2"))
            sockets.append(describe(c, "CLOSE_WAIT"))
        sockets.append(describe(c2, "CLOSE_WAIT"))
        sockets.append(
            {
                "state": "FIN_WAIT2",
                "local": fmt.format(*orphan[0][:2]),
                "peer": fmt.format(*orphan[1][:2]),
                "inode": 0,
                "orphan": True,
            }
        )
        sockets.append(describe(lst, "LISTEN", info=False))
    dumps["both"] = {"half_closed": {"seq": 9, "datagrams": dump(socket.AF_UNSPEC, HALF_CLOSED, 9)}}
    data = {"kernel": os.uname().release, "dumps": dumps, "sockets": sockets}
    with gzip.open(HERE / "sockdiag_shapes.json.gz", "wt") as f:
        json.dump(data, f, indent=0)
    for s in keep:
        s.close()


def main() -> int:
    return scratchns.run(__file__, inside, "shp")


if __name__ == "__main__":
    sys.exit(main())
