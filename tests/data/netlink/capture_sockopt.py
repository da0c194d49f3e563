"""Regenerate ``sockdiag_sockopt_*.dump`` and ``sockopt_expected.json`` (root, real kernel).

    sudo .venv/bin/python tests/data/netlink/capture_sockopt.py

A companion of capture.py for the two sock_diag fields the four-part proof
added (design.md §2): ``INET_DIAG_SOCKOPT``'s transparent bit and tcp_info's
``tcpi_last_data_sent``.  In a scratch netns it holds:

- an IP_TRANSPARENT listener on 127.0.0.1:15006 (what a TPROXY proxy listens
  with) and a connection accepted from it, half-closed by the proxy side
  (FIN_WAIT2, transparent inherited from the listener);
- a plain listener on 127.0.0.1:8080 with an ESTABLISHED connection (not
  transparent), whose accepted side sent data ~0.4 s before the dump and
  whose client side last sent ~0.8 s before it;
- a dual-stack listener on [::]:15001 (IPV6_V6ONLY=0, as ztunnel binds) with
  an IPv4 client: the accepted socket is AF_INET6 with IPv4-mapped addresses.

The expectations come from the socket objects (getsockopt IP_TRANSPARENT,
TCP_INFO right after the dump, getsockname), not from the parser under test.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scratchns
from capture import describe, diag_dump, write_dump

HERE = Path(__file__).resolve().parent
IP_TRANSPARENT = 19
TCP_INFO_LEN = 232


def last_data_sent(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    return int(struct.unpack_from("=I", info, 44)[0])


def inside() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    time.sleep(0.2)
    keep: list[socket.socket] = []

    tl = socket.socket()
    tl.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    tl.bind(("127.0.0.1", 15006))
    tl.listen(4)
    tc = socket.create_connection(("127.0.0.1", 15006))
    ta, _ = tl.accept()
    ta.sendall(b"x" * 5)
    tc.recv(16)
    ta.shutdown(socket.SHUT_WR)  # the proxy side half-closes: FIN_WAIT2
    keep += [tl, tc, ta]

    pl = socket.socket()
    pl.bind(("127.0.0.1", 8080))
    pl.listen(4)
    pc = socket.create_connection(("127.0.0.1", 8080))
    pa, _ = pl.accept()
    pc.sendall(b"c" * 3)
    pa.recv(16)
    time.sleep(0.4)
    pa.sendall(b"a" * 7)
    pc.recv(16)
    keep += [pl, pc, pa]

    dl = socket.socket(socket.AF_INET6)
    dl.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    dl.bind(("::", 15001))
    dl.listen(4)
    dc = socket.create_connection(("127.0.0.1", 15001))
    da, _ = dl.accept()
    keep += [dl, dc, da]
    time.sleep(0.4)

    v4 = diag_dump(socket.AF_INET)
    v6 = diag_dump(socket.AF_INET6)
    sockets = []
    for sock, state, info in (
        (tl, "LISTEN", False),
        (ta, "FIN_WAIT2", True),
        (tc, "CLOSE_WAIT", True),
        (pl, "LISTEN", False),
        (pa, "ESTABLISHED", True),
        (pc, "ESTABLISHED", True),
        (dl, "LISTEN", False),
        (da, "ESTABLISHED", True),
    ):
        d = describe(sock, state, info=info)
        d["transparent"] = bool(sock.getsockopt(socket.SOL_IP, IP_TRANSPARENT))
        if info:
            d["last_data_sent_ms"] = last_data_sent(sock)
        sockets.append(d)
    write_dump("sockdiag_sockopt_v4.dump", v4, "SOCK_DIAG_BY_FAMILY AF_INET dump (sockopt)")
    write_dump("sockdiag_sockopt_v6.dump", v6, "SOCK_DIAG_BY_FAMILY AF_INET6 dump (sockopt)")
    (HERE / "sockopt_expected.json").write_text(json.dumps({"sockets": sockets}, indent=2) + "\n")
    for s in keep:
        s.close()


def main() -> int:
    return scratchns.run(__file__, inside, "cap")


if __name__ == "__main__":
    sys.exit(main())
