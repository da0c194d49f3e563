"""A tiny sidecar mesh in a scratch netns, with per-connection payload sizes.

The lab forms its leaks with identical traffic, so nothing in the kernel tells
its pairs apart; real connections differ.  Here each connection carries its
own byte counts, so the scanner's pairing can be checked against ground truth.

Two processes, as in a pod: the *proxy* (which also plays the upstream server,
at 203.0.113.10:7777 on lo) and the *app*.  The proxy's upstream dials carry a
socket mark that the REDIRECT rule exempts (Istio's TPROXY mode does the same).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from support.meshrules import MARK, capture_rules
from support.scratchnet import Holder, run, scratch_netns

SERVICE = ("203.0.113.10", 7777)

PROXY = r"""
import json, socket, struct, sys
lst = socket.socket(); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("0.0.0.0", 15001)); lst.listen(512)
srv = socket.socket(); srv.bind(("203.0.113.10", 7777)); srv.listen(512)
conns = []
def exact(s, n):
    b = b""
    while len(b) < n:
        d = s.recv(n - len(b))
        if not d: raise EOFError
        b += d
    return b
print("READY", flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "conn":               # relay one connection: app->up bytes, up->app bytes
        pu, pd = int(args[0]), int(args[1])
        down, _ = lst.accept()
        port, ip = struct.unpack_from("!2xH4s", down.getsockopt(socket.SOL_IP, 80, 16))
        up = socket.socket(); up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, @MARK@)
        up.connect((socket.inet_ntoa(ip), port))
        s, _ = srv.accept()
        up.sendall(exact(down, pu)); exact(s, pu)
        s.sendall(b"d" * pd); down.sendall(exact(up, pd))
        conns.append((down, up, s))
        ep = lambda a: f"{a[0]}:{a[1]}"
        print(json.dumps({"down": ep(down.getsockname()), "app": ep(down.getpeername()),
                          "up": ep(up.getsockname())}), flush=True)
        print("OK", flush=True)
    elif cmd == "upstream-close":   # the upstream closes; the proxy forwards the FIN
        for down, up, s in conns: s.close()
        for down, up, s in conns:
            assert up.recv(1) == b""
            down.shutdown(socket.SHUT_WR)
        print("OK", flush=True)
""".replace("@MARK@", str(MARK))

APP = r"""
import socket, sys, threading, time
conns = []
live = []
def keep_sending():
    for _ in range(2000):           # bounded: ~10 minutes at most
        for s in list(live):
            try: s.send(b".")
            except OSError: pass
        time.sleep(0.3)
threading.Thread(target=keep_sending, daemon=True).start()
print("READY", flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "connect":
        pu, pd = int(args[0]), int(args[1])
        s = socket.create_connection(("203.0.113.10", 7777)); s.sendall(b"u" * pu)
        conns.append((s, pd))
        print("OK", flush=True)
    elif cmd == "drain":            # read the replies and the forwarded FIN
        for s, pd in conns:
            got = 0
            while True:
                d = s.recv(65536)
                if not d: break
                got += len(d)
            assert got == pd, (got, pd)
        print("OK", flush=True)
    elif cmd == "live":             # keep these sending: their NAT entry stays alive
        live.extend(conns[int(i)][0] for i in args)
        print("OK", flush=True)
    elif cmd == "close":
        for i in args: conns[int(i)][0].close()
        print("OK", flush=True)
"""


@dataclass(frozen=True, slots=True)
class Conn:
    app: str  # the app's endpoint (the proxy downstream socket's peer)
    down: str  # the proxy's downstream socket (127.0.0.1:15001)
    up: str  # the proxy's upstream socket's local endpoint


@dataclass
class MiniMesh:
    netns: str
    proxy: Holder
    app: Holder
    leaked: list[Conn]
    live: list[Conn]


def _entries_gone(netns: str, apps: list[str]) -> bool:
    out = run("conntrack", "-L", "-p", "tcp", netns=netns, check=False).stdout
    return not any(f"sport={a.rpartition(':')[2]} " in out for a in apps)


@contextlib.contextmanager
def minimesh(leaks: int, live: int, close_wait_timeout: int = 1) -> Iterator[MiniMesh]:
    """``leaks`` leaked pairs and ``live`` at-risk ones, each with distinct byte counts."""
    with scratch_netns("mm") as ns:
        run("ip", "addr", "add", "192.0.2.10/24", "dev", "lo", netns=ns)
        run("ip", "addr", "add", "203.0.113.10/32", "dev", "lo", netns=ns)
        run("iptables", "-t", "nat", "-N", "MESH_OUTPUT", netns=ns)
        run("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "MESH_OUTPUT", netns=ns)
        for argv in capture_rules("MESH_OUTPUT"):
            run(*argv, netns=ns)
        run(
            "sysctl",
            "-qw",
            f"net.netfilter.nf_conntrack_tcp_timeout_close_wait={close_wait_timeout}",
            netns=ns,
        )
        proxy = Holder(ns, PROXY, hold=False)
        app = Holder(ns, APP, hold=False)
        try:
            conns = []
            for i in range(leaks + live):
                app.send(f"connect {10 + 3 * i} {100 + 7 * i}")
                app.expect("OK")
                proxy.send(f"conn {10 + 3 * i} {100 + 7 * i}")
                (info,) = proxy.expect("OK")
                d = json.loads(info)
                conns.append(Conn(d["app"], d["down"], d["up"]))
            proxy.send("upstream-close")
            proxy.expect("OK")
            app.send("drain")
            app.expect("OK")
            live_idx = list(range(leaks, leaks + live))
            app.send("live " + " ".join(map(str, live_idx)))
            app.expect("OK")
            leak_apps = [c.app for c in conns[:leaks]]
            deadline = time.monotonic() + close_wait_timeout + 10
            while not _entries_gone(ns, leak_apps):
                if time.monotonic() > deadline:
                    raise TimeoutError("conntrack entries did not expire")
                time.sleep(0.2)
            app.send("close " + " ".join(map(str, range(leaks))))
            app.expect("OK")
            time.sleep(0.2)  # the app's FIN goes out (and is lost)
            yield MiniMesh(ns, proxy, app, conns[:leaks], conns[leaks:])
        finally:
            app.close()
            proxy.close()


def ss_lines(netns: str, *filters: str) -> list[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "ss", "-Htan", *filters],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
