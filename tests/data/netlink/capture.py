"""Regenerate the replayed kernel messages in this directory (root, real kernel).

    sudo .venv/bin/python tests/data/netlink/capture.py

Builds a scratch netns (unique name, deleted afterwards) holding TCP sockets in
known states over IPv4 and IPv6 behind a REDIRECT rule, then records the raw
bytes the kernel returns for the requests the scanner makes:

- ``sockdiag_v4.dump`` / ``sockdiag_v6.dump``: SOCK_DIAG_BY_FAMILY dumps (all
  states, with INET_DIAG_INFO)
- ``conntrack_get_v4.dump`` / ``conntrack_get_v6.dump``: IPCTNL_MSG_CT_GET by
  reply tuple for a live entry; ``conntrack_get_enoent.dump``: the same for a
  tuple that has no entry; ``conntrack_dump.dump``: a full table dump
- ``expected.json``: what the sockets are, recorded from the socket objects
  themselves (getsockname, fstat inode, SO_COOKIE, TCP_INFO), not from our
  parser, so the codec tests check the parser against an independent source.

The request bytes are built here with plain struct code (not the codecs under
test).  Dumps are hex text, one kernel datagram per block.
"""

from __future__ import annotations

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

HERE = Path(__file__).resolve().parent
SO_COOKIE = 57
SO_ORIGINAL_DST = 80
TCP_INFO_LEN = 232

NLMSG = struct.Struct("=IHHII")
NLA = struct.Struct("=HH")


def nlmsg(msg_type: int, flags: int, seq: int, payload: bytes) -> bytes:
    return NLMSG.pack(NLMSG.size + len(payload), msg_type, flags, seq, 0) + payload


def nla(t: int, v: bytes) -> bytes:
    n = NLA.size + len(v)
    return NLA.pack(n, t) + v + b"\0" * ((4 - n % 4) % 4)


def recv_all(sock: socket.socket, seq: int, until_done: bool) -> list[bytes]:
    """Datagrams up to NLMSG_DONE (dump) or the first message for ``seq``."""
    out = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        data = sock.recv(1 << 20)
        out.append(data)
        off = 0
        while off + 16 <= len(data):
            length, typ, _f, s, _p = NLMSG.unpack_from(data, off)
            if s == seq and (not until_done or typ in (2, 3)):
                return out
            off += (length + 3) & ~3
    raise TimeoutError("no netlink answer")


def write_dump(name: str, datagrams: list[bytes], note: str) -> None:
    lines = [f"# {note}", f"# captured on Linux {os.uname().release}"]
    for d in datagrams:
        lines.append("# datagram")
        lines.extend(d[i : i + 32].hex() for i in range(0, len(d), 32))
    (HERE / name).write_text("\n".join(lines) + "\n")


def diag_dump(family: int) -> list[bytes]:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4)
    s.bind((0, 0))
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 1 << 1, 0, 0xFFFFFFFF)
    req += struct.pack("!HH16s16s", 0, 0, b"\0" * 16, b"\0" * 16)
    req += struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)
    s.send(nlmsg(20, 0x1 | 0x300, 7, req))
    try:
        return recv_all(s, 7, until_done=True)
    finally:
        s.close()


def ct_tuple(attr: int, src: str, sport: int, dst: str, dport: int) -> bytes:
    fam = socket.AF_INET6 if ":" in src else socket.AF_INET
    a, b = (3, 4) if fam == socket.AF_INET6 else (1, 2)
    ip = nla(1 | 0x8000, nla(a, socket.inet_pton(fam, src)) + nla(b, socket.inet_pton(fam, dst)))
    proto = nla(
        2 | 0x8000,
        nla(1, bytes([6])) + nla(2, struct.pack("!H", sport)) + nla(3, struct.pack("!H", dport)),
    )
    return nla(attr | 0x8000, ip + proto)


def ct_get_reply(src: str, sport: int, dst: str, dport: int) -> list[bytes]:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
    s.bind((0, 0))
    fam = socket.AF_INET6 if ":" in src else socket.AF_INET
    payload = struct.pack("!BBH", fam, 0, 0) + ct_tuple(2, src, sport, dst, dport)
    s.send(nlmsg((1 << 8) | 1, 0x1, 9, payload))
    try:
        return recv_all(s, 9, until_done=False)
    finally:
        s.close()


def ct_dump() -> list[bytes]:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
    s.bind((0, 0))
    s.send(nlmsg((1 << 8) | 1, 0x1 | 0x300, 11, struct.pack("!BBH", socket.AF_INET, 0, 0)))
    try:
        return recv_all(s, 11, until_done=True)
    finally:
        s.close()


def describe(sock: socket.socket, state: str, *, info: bool = True) -> dict[str, object]:
    fam = sock.family

    def ep(addr: tuple[str, int] | tuple[str, int, int, int]) -> str:
        return f"[{addr[0]}]:{addr[1]}" if fam == socket.AF_INET6 else f"{addr[0]}:{addr[1]}"

    d: dict[str, object] = {
        "state": state,
        "local": ep(sock.getsockname()),
        "peer": ep(sock.getpeername()) if state != "LISTEN" else None,
        "inode": os.fstat(sock.fileno()).st_ino,
        "cookie": struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0],
        "uid": os.geteuid(),
    }
    if info:
        ti = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
        d["bytes_acked"], d["bytes_received"] = struct.unpack_from("=QQ", ti, 120)
    return d


def pair(
    listener: socket.socket, fam: int, dst: tuple[str, int], send: int, back: int
) -> tuple[socket.socket, socket.socket]:
    c = socket.socket(fam, socket.SOCK_STREAM)
    c.connect(dst)
    a, _ = listener.accept()
    c.sendall(b"c" * send)
    a.sendall(b"a" * back)
    got = 0
    while got < send:
        got += len(a.recv(65536))
    got = 0
    while got < back:
        got += len(c.recv(65536))
    return c, a


def inside() -> None:
    """Runs in the scratch netns (``ip netns exec``)."""
    run = lambda *a: subprocess.run(a, check=True)  # noqa: E731
    run("ip", "link", "set", "lo", "up")
    run("ip", "addr", "add", "192.0.2.10/24", "dev", "lo")
    run("ip", "-6", "addr", "add", "2001:db8::10/128", "dev", "lo")
    for tool, dst in (("iptables", "192.0.2.99"), ("ip6tables", "2001:db8::99")):
        run(
            tool,
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            dst,
            "--dport",
            "7777",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        )
    run("ip", "route", "add", "192.0.2.99/32", "dev", "lo")
    run("ip", "-6", "route", "add", "2001:db8::99/128", "dev", "lo")
    time.sleep(1.0)  # IPv6 DAD on lo addresses is instant, routes settle

    socks: list[socket.socket] = []
    expected: dict[str, list[dict[str, object]]] = {"v4": [], "v6": []}
    entries = []
    for key, fam, any_, target, origin in (
        ("v4", socket.AF_INET, "0.0.0.0", ("192.0.2.99", 7777), "192.0.2.99"),
        ("v6", socket.AF_INET6, "::", ("2001:db8::99", 7777), "2001:db8::99"),
    ):
        lst = socket.socket(fam, socket.SOCK_STREAM)
        if fam == socket.AF_INET6:
            lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        lst.bind((any_, 15001))
        lst.listen(16)
        socks.append(lst)
        expected[key].append(describe(lst, "LISTEN", info=False))
        # Half-closed through the REDIRECT: proxy side FIN_WAIT2, app side CLOSE_WAIT.
        app, proxy = pair(lst, fam, target, send=11, back=23)
        proxy.shutdown(socket.SHUT_WR)
        time.sleep(0.05)
        socks += [app, proxy]
        expected[key].append(describe(proxy, "FIN_WAIT2"))
        expected[key].append(describe(app, "CLOSE_WAIT"))
        app_addr = app.getsockname()
        entries.append(
            {
                "family": key,
                "original": [app_addr[0], app_addr[1], origin, 7777],
                "reply": [proxy.getsockname()[0], 15001, app_addr[0], app_addr[1]],
                "tcp_state": "CLOSE_WAIT",
            }
        )
        # Plain ESTABLISHED (not redirected).
        lst2 = socket.socket(fam, socket.SOCK_STREAM)
        if fam == socket.AF_INET6:
            lst2.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        lst2.bind((any_, 8080))
        lst2.listen(4)
        local = ("192.0.2.10", 8080) if fam == socket.AF_INET else ("2001:db8::10", 8080)
        c, a = pair(lst2, fam, local, send=5, back=7)
        socks += [lst2, c, a]
        expected[key].append(describe(c, "ESTABLISHED"))
        expected[key].append(describe(a, "ESTABLISHED"))
        expected[key].append(describe(lst2, "LISTEN", info=False))
        # Orphaned FIN_WAIT2: close() (not shutdown) -> a timewait minisocket
        # in FIN_WAIT2 substate, inode 0, no tcp_info.
        c2, a2 = pair(lst2, fam, local, send=1, back=1)
        orphan_local = a2.getsockname()
        orphan_peer = c2.getsockname()
        a2.close()
        time.sleep(0.05)
        socks.append(c2)
        fmt = "[{}]:{}" if fam == socket.AF_INET6 else "{}:{}"
        expected[key].append(
            {
                "state": "FIN_WAIT2",
                "local": fmt.format(*orphan_local[:2]),
                "peer": fmt.format(*orphan_peer[:2]),
                "inode": 0,
                "orphan": True,
            }
        )
        expected[key].append(describe(c2, "CLOSE_WAIT"))

    write_dump("sockdiag_v4.dump", diag_dump(socket.AF_INET), "SOCK_DIAG_BY_FAMILY AF_INET dump")
    write_dump("sockdiag_v6.dump", diag_dump(socket.AF_INET6), "SOCK_DIAG_BY_FAMILY AF_INET6 dump")
    for e in entries:
        r = e["reply"]
        assert isinstance(r, list)
        write_dump(
            f"conntrack_get_{e['family']}.dump",
            ct_get_reply(r[0], r[1], r[2], r[3]),
            "IPCTNL_MSG_CT_GET by CTA_TUPLE_REPLY (entry exists)",
        )
    write_dump(
        "conntrack_get_enoent.dump",
        ct_get_reply("127.0.0.1", 15001, "192.0.2.10", 1),
        "IPCTNL_MSG_CT_GET by CTA_TUPLE_REPLY (no such entry: ENOENT)",
    )
    write_dump("conntrack_dump.dump", ct_dump(), "IPCTNL_MSG_CT_GET dump, AF_INET")
    (HERE / "expected.json").write_text(
        json.dumps({"sockets": expected, "conntrack": entries}, indent=2) + "\n"
    )
    for s in socks:
        s.close()


def main() -> int:
    return scratchns.run(__file__, inside, "cap")


if __name__ == "__main__":
    sys.exit(main())
