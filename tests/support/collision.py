"""istio#43301 on the real kernel: an app reuses a leaked socket's port (root only).

One scratch netns plays a pod: the app at 192.0.2.10, a "remote" service at
203.0.113.10:7777, and a proxy on :15001 fed by an iptables REDIRECT (its
upstream dials are exempt by SO_MARK, as Istio's are).  ``collision()`` forms
a leak exactly as in the field — the upstream closes, the proxy forwards the
FIN with ``shutdown(SHUT_WR)``, the NAT entry expires in CLOSE_WAIT, and only
then does the app close (its FIN goes un-NATed to the real service) — so the
proxy's downstream socket ``127.0.0.1:15001 <- 192.0.2.10:P`` sits in FIN_WAIT2
with no conntrack entry.

``Collision.reconnect()`` then makes the app connect again from the same
port P to the same service (``bind()`` to it).  The SYN is NATed to the proxy
port and meets the stale FIN_WAIT2 socket, which answers with a challenge ACK
(RFC 5961).  Normally that ACK reaches the app un-NATed (conntrack calls it
INVALID), the app's kernel answers with a RST, the RST resets the stale socket
and the SYN retransmitted a second later succeeds.  When the challenge ACK is
lost — here a raw-table rule drops it, as Istio's DROP_INVALID rule can — the
app's connect hangs on SYN retransmissions while conntrack holds a SYN_SENT
entry under the stale socket's reply tuple: the hang of istio#43301.

Clock: the app prints CLOCK_MONOTONIC stamps (``time.monotonic()`` is the same
clock in every process), so the test can measure from its own stamps.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from halfclose.agent.core.classify import DELAYED_ACK_MARGIN_SECONDS
from support.scratchnet import Holder, run, scratch_netns

APP_IP = "192.0.2.10"
SERVICE = ("203.0.113.10", 7777)
PROXY_PORT = 15001
MARK = 0x539
# The netns's CLOSE_WAIT timeout: the leak forms this long after the upstream
# closes.  design.md §2 part 4 wants silence >= min(close_wait, fin_wait) of
# the netns plus DELAYED_ACK_MARGIN_SECONDS, waited out below.
CLOSE_WAIT = 2

PROXY = r"""
import socket, struct, sys
lst = socket.socket(); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("0.0.0.0", @PORT@)); lst.listen(64)
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("@SIP@", @SPORT@)); srv.listen(64)
held = []
print("READY", flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "relay":              # one proxied connection, then the upstream closes
        down, _ = lst.accept()
        port, ip = struct.unpack_from("!2xH4s", down.getsockopt(socket.SOL_IP, 80, 16))
        up = socket.socket(); up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, @MARK@)
        up.connect((socket.inet_ntoa(ip), port))
        s, _ = srv.accept()
        up.sendall(down.recv(100)); s.recv(100)
        s.sendall(b"reply"); down.sendall(up.recv(100))
        s.close()                   # the upstream closes ...
        assert up.recv(1) == b""
        down.shutdown(socket.SHUT_WR)  # ... and the proxy forwards the FIN
        held.append((down, up))
        print("OK", flush=True)
""".replace("@PORT@", str(PROXY_PORT)).replace("@MARK@", str(MARK))
PROXY = PROXY.replace("@SIP@", SERVICE[0]).replace("@SPORT@", str(SERVICE[1]))

APP = (
    r"""
import errno, socket, sys, threading, time
first = None
def dial(port, timeout):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("@AIP@", port)); s.settimeout(timeout)
    return s
def attempt(s):
    try:
        s.connect(("@SIP@", @SPORT@))
        print(f"CONNECTED {time.monotonic():.6f}", flush=True)
    except OSError as exc:
        print(f"FAILED {exc.errno} {time.monotonic():.6f}", flush=True)
    print("DONE", flush=True)
    held.append(s)
held = []
print("READY", flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "connect":            # the first connection, through the proxy
        first = dial(0, 10)
        first.connect(("@SIP@", @SPORT@))
        first.sendall(b"hello")
        print(first.getsockname()[1], flush=True)
        print("OK", flush=True)
    elif cmd == "drain":            # the reply and the proxy's forwarded FIN
        got = b""
        while True:
            d = first.recv(100)
            if not d: break
            got += d
        assert got == b"reply", got
        print("OK", flush=True)
    elif cmd == "close":            # too late: the NAT entry is gone
        first.close()
        print("OK", flush=True)
    elif cmd == "reconnect":        # same port, same service; answer comes later
        s = dial(int(args[0]), float(args[1]))
        print(f"STARTED {time.monotonic():.6f}", flush=True)
        print("OK", flush=True)
        threading.Thread(target=attempt, args=(s,), daemon=True).start()
""".replace("@AIP@", APP_IP)
    .replace("@SIP@", SERVICE[0])
    .replace("@SPORT@", str(SERVICE[1]))
)


def conntrack_lines(netns: str) -> list[str]:
    out = run("conntrack", "-L", "-p", "tcp", netns=netns, check=False).stdout
    return [line for line in out.splitlines() if line.strip()]


def entries_of(netns: str, app_port: int) -> list[str]:
    """conntrack entries whose original source port is the app's port."""
    return [line for line in conntrack_lines(netns) if f" sport={app_port} " in line]


@dataclass
class Connect:
    """The app's second connect from the leaked socket's port."""

    started: float  # CLOCK_MONOTONIC when connect() was called
    app: Holder

    def result(self, timeout: float) -> tuple[str, float]:
        """("CONNECTED" | "FAILED <errno>", CLOCK_MONOTONIC stamp), waiting <= timeout."""
        (line,) = self.app.expect("DONE", timeout)
        what, _, stamp = line.rpartition(" ")
        return what, float(stamp)


@dataclass
class Collision:
    netns: str
    proxy: Holder
    app: Holder
    app_port: int  # P: the leaked socket's peer port, which the app reuses

    @property
    def stale(self) -> str:
        """The proxy's leaked socket as ``ss`` prints it: (local, peer)."""
        return f"127.0.0.1:{PROXY_PORT} <- {APP_IP}:{self.app_port}"

    def drop_challenge_acks(self) -> None:
        """Lose the stale socket's challenge ACKs: ACK without SYN/RST, proxy port -> app port.

        In the raw table, so conntrack never sees them (as if lost on the way).
        """
        run(
            "iptables", "-t", "raw", "-A", "OUTPUT", "-p", "tcp",
            "-s", "127.0.0.1", "--sport", str(PROXY_PORT),
            "-d", APP_IP, "--dport", str(self.app_port),
            "--tcp-flags", "SYN,RST,ACK", "ACK", "-j", "DROP",
            netns=self.netns,
        )  # fmt: skip

    def reconnect(self, timeout: float = 20.0) -> Connect:
        self.app.send(f"reconnect {self.app_port} {timeout}")
        (line,) = self.app.expect("OK")
        return Connect(float(line.split()[1]), self.app)

    def syn_sent_entry(self) -> str | None:
        """The conntrack entry of the new connection, once it is in SYN_SENT."""
        for line in entries_of(self.netns, self.app_port):
            if "SYN_SENT" in line and f"sport={PROXY_PORT} dport={self.app_port}" in line:
                return line
        return None

    def wait_syn_sent(self, timeout: float = 3.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.syn_sent_entry()
            if entry is not None:
                return entry
            time.sleep(0.01)
        raise TimeoutError(f"no SYN_SENT entry for :{self.app_port}: {conntrack_lines(self.netns)}")

    def ss(self) -> list[tuple[str, str, str]]:
        out = run("ss", "-Htan", netns=self.netns).stdout
        return [
            (f[0], f[3], f[4]) for f in (line.split() for line in out.splitlines()) if len(f) >= 5
        ]

    def stale_present(self) -> bool:
        want = ("FIN-WAIT-2", f"127.0.0.1:{PROXY_PORT}", f"{APP_IP}:{self.app_port}")
        return want in self.ss()


def _rules(ns: str) -> None:
    run("ip", "addr", "add", f"{APP_IP}/24", "dev", "lo", netns=ns)
    run("ip", "addr", "add", f"{SERVICE[0]}/32", "dev", "lo", netns=ns)
    nat = ("iptables", "-t", "nat")
    run(*nat, "-N", "MESH_OUTPUT", netns=ns)
    run(*nat, "-A", "OUTPUT", "-p", "tcp", "-j", "MESH_OUTPUT", netns=ns)
    run(*nat, "-A", "MESH_OUTPUT", "-m", "mark", "--mark", hex(MARK), "-j", "RETURN", netns=ns)
    run(
        *nat, "-A", "MESH_OUTPUT", "-p", "tcp", "-d", SERVICE[0], "--dport", str(SERVICE[1]),
        "-j", "REDIRECT", "--to-ports", str(PROXY_PORT), netns=ns,
    )  # fmt: skip
    run(
        "sysctl", "-qw", f"net.netfilter.nf_conntrack_tcp_timeout_close_wait={CLOSE_WAIT}",
        netns=ns,
    )  # fmt: skip


@contextlib.contextmanager
def pod() -> Iterator[tuple[str, Holder, Holder]]:
    """The netns with its rules, the proxy and the app (no traffic yet)."""
    with scratch_netns("coll") as ns:
        _rules(ns)
        proxy = Holder(ns, PROXY, hold=False)
        try:
            app = Holder(ns, APP, hold=False)
            try:
                yield ns, proxy, app
            finally:
                app.close()
        finally:
            proxy.close()


def form_leak(ns: str, proxy: Holder, app: Holder) -> Collision:
    """One leaked proxy socket, formed as in the field (module docstring)."""
    app.send("connect")
    (port_line,) = app.expect("OK")
    proxy.send("relay")
    proxy.expect("OK")
    app.send("drain")
    app.expect("OK")
    port = int(port_line)
    deadline = time.monotonic() + CLOSE_WAIT + 15
    while entries_of(ns, port):  # the CLOSE_WAIT entry expires (the dump reaps it)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the NAT entry of :{port} did not expire")
        time.sleep(0.1)
    # Part 4's bar is the timeout plus the delayed-ACK margin: wait that out too.
    time.sleep(DELAYED_ACK_MARGIN_SECONDS)
    app.send("close")
    app.expect("OK")
    found = Collision(ns, proxy, app, port)
    # The app's late FIN went un-NATed to the service, whose RST closes the
    # app's socket: port P is free again, the proxy's socket stays.
    deadline = time.monotonic() + 5
    while any(r[1] == f"{APP_IP}:{port}" for r in found.ss()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the app's socket on :{port} did not close: {found.ss()}")
        time.sleep(0.05)
    assert found.stale_present(), found.ss()
    return found


@contextlib.contextmanager
def collision() -> Iterator[Collision]:
    with pod() as (ns, proxy, app):
        yield form_leak(ns, proxy, app)
