"""Regenerate ``proof_*.dump`` and ``proof_expected.json`` (root, real kernel).

    sudo .venv/bin/python tests/data/netlink/capture_proof.py

A companion of capture.py for the four-part proof (design.md §2).  In a
scratch netns (unique name, deleted afterwards) with a TCP REDIRECT of
192.0.2.99:7777 to 15001, a UDP REDIRECT of port 53 to 15053 and
``nf_conntrack_tcp_timeout_close_wait`` = 1 s, a dual-stack proxy listener
``[::]:15001`` (IPV6_V6ONLY=0, as ztunnel binds) accepts three IPv4 apps, so its
sockets hold IPv4-mapped addresses; the proxy half-closes each (FIN_WAIT2):

- ``live``: its entry is kept (timeout raised to 300 s by an update);
- ``gone``: its entry is deleted (``conntrack -D``);
- ``collision``: its entry is deleted and a SYN_SENT entry with the same
  tuples is inserted (``conntrack -I``), as when the app reuses the port
  for a new connection (istio#43301);

plus ``plain``: a server on 192.0.2.10:8080 (no NAT) half-closed a connection.
A UDP datagram to port 53 leaves a UDP DST_NAT entry (to 15053).  Then all is
left silent for 1.5 s and recorded:

- ``proof_sockdiag_v4.dump`` / ``_v6.dump``: SOCK_DIAG_BY_FAMILY dumps;
- ``proof_dst_nat_v4.dump``: the DST_NAT dump as the scanner asks for it
  (CTA_STATUS/CTA_STATUS_MASK = IPS_DST_NAT, CTA_FILTER on TCP), and
  ``proof_ct_dump_v4.dump``: the unfiltered table (UDP entry included);
- ``proof_get_<name>.dump``: IPCTNL_MSG_CT_GET by the *normalized* (IPv4)
  reply tuple of each proxy socket; ``proof_get_mapped.dump``: the same for
  ``live`` asked as AF_INET6 with the mapped addresses (ENOENT: the bug);
- ``proof_expected.json``: the sockets (from the socket objects), the tuples
  asked for, and the netns's half-closed timeouts (from its sysctls).

Request bytes are built here with plain struct code (not the codecs under test).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scratchns
from capture import ct_tuple, describe, diag_dump, nla, nlmsg, recv_all, write_dump

HERE = Path(__file__).resolve().parent
APP = "192.0.2.10"
SERVICE = ("192.0.2.99", 7777)
IPS_DST_NAT = 1 << 5
CTA_TUPLE_ORIG, CTA_STATUS, CTA_FILTER, CTA_STATUS_MASK = 1, 3, 25, 26
CTA_FILTER_ORIG_FLAGS = 1
CTA_FILTER_F_CTA_PROTO_NUM = 1 << 3


def ct_socket() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
    s.bind((0, 0))
    return s


def ct_get(fam: int, tuple_attr: bytes, seq: int) -> list[bytes]:
    s = ct_socket()
    try:
        s.send(nlmsg((1 << 8) | 1, 0x1, seq, struct.pack("!BBH", fam, 0, 0) + tuple_attr))
        return recv_all(s, seq, until_done=False)
    finally:
        s.close()


def mapped_tuple(src: str, sport: int, dst: str, dport: int) -> bytes:
    """CTA_TUPLE_REPLY with IPv4-mapped IPv6 addresses (what the old code sent)."""
    a = socket.inet_pton(socket.AF_INET6, f"::ffff:{src}")
    b = socket.inet_pton(socket.AF_INET6, f"::ffff:{dst}")
    ip = nla(1 | 0x8000, nla(3, a) + nla(4, b))
    proto = nla(
        2 | 0x8000,
        nla(1, bytes([6])) + nla(2, struct.pack("!H", sport)) + nla(3, struct.pack("!H", dport)),
    )
    return nla(2 | 0x8000, ip + proto)


def ct_dump(filtered: bool, seq: int) -> list[bytes]:
    payload = struct.pack("!BBH", socket.AF_INET, 0, 0)
    if filtered:
        payload += nla(CTA_TUPLE_ORIG | 0x8000, nla(2 | 0x8000, nla(1, bytes([6]))))
        payload += nla(
            CTA_FILTER | 0x8000,
            nla(CTA_FILTER_ORIG_FLAGS, struct.pack("=I", CTA_FILTER_F_CTA_PROTO_NUM)),
        )
        payload += nla(CTA_STATUS, struct.pack("!I", IPS_DST_NAT))
        payload += nla(CTA_STATUS_MASK, struct.pack("!I", IPS_DST_NAT))
    s = ct_socket()
    try:
        s.send(nlmsg((1 << 8) | 1, 0x1 | 0x300, seq, payload))
        return recv_all(s, seq, until_done=True)
    finally:
        s.close()


def sysctl(name: str) -> int:
    return int(Path("/proc/sys/net/netfilter", name).read_text())


def inside() -> None:
    """Runs in the scratch netns (``ip netns exec``)."""

    def run(*argv: str) -> None:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)}: {proc.stderr.strip()}")

    run("ip", "link", "set", "lo", "up")
    run("ip", "addr", "add", f"{APP}/24", "dev", "lo")
    run("ip", "route", "add", f"{SERVICE[0]}/32", "dev", "lo")
    run(
        "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", SERVICE[0],
        "--dport", str(SERVICE[1]), "-j", "REDIRECT", "--to-ports", "15001",
    )  # fmt: skip
    run(
        "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53",
        "-j", "REDIRECT", "--to-ports", "15053",
    )  # fmt: skip
    Path("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait").write_text("1\n")

    proxy_l = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    proxy_l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    proxy_l.bind(("::", 15001))
    proxy_l.listen(16)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 15053))
    plain_l = socket.socket()
    plain_l.bind((APP, 8080))
    plain_l.listen(4)

    socks: list[socket.socket] = [proxy_l, udp, plain_l]
    proxies: dict[str, dict[str, object]] = {}
    apps: dict[str, tuple[str, int]] = {}
    for name in ("live", "gone", "collision"):
        app = socket.create_connection(SERVICE)
        proxy, _ = proxy_l.accept()
        app.sendall(b"x" * 5)
        proxy.recv(16)
        proxy.shutdown(socket.SHUT_WR)  # the upstream went: FIN_WAIT2 / CLOSE_WAIT
        socks += [app, proxy]
        apps[name] = app.getsockname()
        proxies[name] = describe(proxy, "FIN_WAIT2")
    c = socket.create_connection((APP, 8080))
    plain, _ = plain_l.accept()
    plain.shutdown(socket.SHUT_WR)
    socks += [c, plain]
    proxies["plain"] = describe(plain, "FIN_WAIT2")
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.sendto(b"q", ("192.0.2.1", 53))
    socks.append(sender)
    time.sleep(0.1)

    def ports(name: str) -> list[str]:
        return ["-p", "tcp", "--orig-port-src", str(apps[name][1])]

    # `conntrack -U` sends the NAT status bits back and gets EOPNOTSUPP for a
    # NATed entry: raise the live entry's timeout with a plain timeout update.
    from halfclose.agent.core.model import FlowTuple
    from halfclose.agent.kernel.conntrack import Conntrack

    ct = Conntrack.open()
    live_reply = FlowTuple(
        ipaddress.ip_address("127.0.0.1"), 15001, ipaddress.ip_address(APP), apps["live"][1]
    )
    entry = ct.get_by_reply(live_reply)
    assert entry is not None, "the live entry is missing"
    ct.update(entry, timeout=300)
    ct.close()
    run("conntrack", "-D", *ports("gone"))
    run("conntrack", "-D", *ports("collision"))
    eport = str(apps["collision"][1])
    run(
        "conntrack", "-I", "-p", "tcp", "-s", APP, "-d", SERVICE[0], "--sport", eport,
        "--dport", str(SERVICE[1]), "-r", "127.0.0.1", "-q", APP, "--reply-port-src", "15001",
        "--reply-port-dst", eport, "--state", "SYN_SENT", "--timeout", "120",
    )  # fmt: skip
    time.sleep(1.5)  # silent longer than close_wait (1 s)

    write_dump("proof_sockdiag_v4.dump", diag_dump(socket.AF_INET), "SOCK_DIAG dump, AF_INET")
    write_dump(
        "proof_sockdiag_v6.dump",
        diag_dump(socket.AF_INET6),
        "SOCK_DIAG dump, AF_INET6 (the dual-stack listener's IPv4-mapped sockets)",
    )
    write_dump(
        "proof_dst_nat_v4.dump",
        ct_dump(True, 21),
        "IPCTNL_MSG_CT_GET dump, AF_INET, filtered: status DST_NAT, protocol TCP",
    )
    write_dump("proof_ct_dump_v4.dump", ct_dump(False, 22), "IPCTNL_MSG_CT_GET dump, AF_INET")
    replies: dict[str, list[object]] = {}
    for seq, name in enumerate(("live", "gone", "collision"), start=30):
        reply = ["127.0.0.1", 15001, APP, apps[name][1]]
        replies[name] = reply
        write_dump(
            f"proof_get_{name}.dump",
            ct_get(socket.AF_INET, ct_tuple(2, "127.0.0.1", 15001, APP, apps[name][1]), seq),
            f"IPCTNL_MSG_CT_GET by the normalized CTA_TUPLE_REPLY of the {name} socket",
        )
    write_dump(
        "proof_get_mapped.dump",
        ct_get(socket.AF_INET6, mapped_tuple("127.0.0.1", 15001, APP, apps["live"][1]), 40),
        "IPCTNL_MSG_CT_GET, AF_INET6, the live socket's reply tuple with mapped addresses",
    )
    doc = {
        "sockets": proxies,
        "replies": replies,
        "timeouts": {
            "close_wait": sysctl("nf_conntrack_tcp_timeout_close_wait"),
            "fin_wait": sysctl("nf_conntrack_tcp_timeout_fin_wait"),
        },
        "silent_at_least_seconds": 1.5,
    }
    (HERE / "proof_expected.json").write_text(json.dumps(doc, indent=2) + "\n")
    for s in socks:
        s.close()


def main() -> int:
    return scratchns.run(__file__, inside, "prf")


if __name__ == "__main__":
    sys.exit(main())
