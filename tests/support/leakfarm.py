"""A scratch netns holding N leaked pairs, as a sidecar leaks them (root; tests and bench).

Built for the 20k-leak scale (issue 11): one pod netns with a REDIRECT of
203.0.113.10:7777 to :15001 (the proxy's own dials, marked 0x539, are exempt),
several proxy processes sharing :15001 (SO_REUSEPORT: the open-file limit is
20,000 per process, design.md §3), each also playing the upstream server on its
own port, and app processes.  Per connection i the app sends a 4-byte index and
2 * (i % 100) bytes, the proxy relays them upstream, the server answers
i // 100 + 1 bytes which the proxy relays down: every pair has its own byte
counters, so pairing has real work and a unique answer.

Then the server closes (FIN), the proxy forwards it (``shutdown(SHUT_WR)``), the
NAT entries expire (close_wait timeout 1 s), and the app closes late: its FIN is
INVALID and lost.  Left in the netns: N FIN_WAIT2 sockets on :15001 and N
CLOSE_WAIT upstream legs (2N sockets examined), all owned by the proxies.  The
servers' orphans go with ``tcp_fin_timeout`` = 1 s, the apps' sockets with the
RST their lost FIN draws.

Loopback drops packets: the per-CPU backlog (``netdev_max_backlog``, 1000,
host-wide) overflows when softirqs are deferred on a busy machine, and the
40,000 FINs of the close burst at 20k pairs are such a burst.  A FIN or its
ACK lost after conntrack saw it makes the sender retransmit the FIN (tail loss
probe or RTO), and conntrack cannot tell a retransmitted FIN from the other
side's: CLOSE_WAIT/FIN_WAIT -> LAST_ACK -> TIME_WAIT, 30 s / 120 s by default.
Those states get a short life here too (``_TIMEOUTS``), and the app is only told
to close once every FIN is acknowledged (no FIN_WAIT1 left) and no NAT entry is
left.

The proxies watch their downstream sockets (epoll): when one is destroyed they
close its upstream leg, as Envoy does, so a kill's upstream verification has
something to see.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from support.meshrules import MARK, capture_rules

IP = "ip"
# The pod netns's conntrack timeouts (per netns).  close_wait: the forwarded
# FIN's NAT entry expires after 1 s, the leak's cause.  last_ack/time_wait: a
# retransmitted FIN (a loopback drop, see above) moves the entry on to these
# states, and their defaults (30 s / 120 s) outlive the wait for the entries to
# go.  2 s, not 1: a later retransmission of the same FIN re-arms the entry;
# one arriving after it expired is not NATed, draws an RST and the pair is lost.
# Longer than close_wait, so the proof's shortest half-closed timeout
# (close_wait, fin_wait: design.md §2 part 4) is unchanged.
_TIMEOUTS = ("close_wait=1", "last_ack=2", "time_wait=2")
PER_PROXY = 5000  # 3 fds per pair while building: 15,000 < 20,000
PER_APP = 10000

PROXY = r"""
import os, select, socket, struct, sys
k = int(sys.argv[1])
lst = socket.socket(); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
lst.bind(("0.0.0.0", 15001)); lst.listen(4096)
srv = socket.socket(); srv.bind(("203.0.113.10", 17000 + k)); srv.listen(4096)
pairs = {}
def exact(s, n):
    b = b""
    while len(b) < n:
        d = s.recv(n - len(b))
        if not d: raise EOFError
        b += d
    return b
print("READY", flush=True)
poll = select.poll(); poll.register(lst, select.POLLIN); poll.register(sys.stdin, select.POLLIN)
servers = []
running = True
while running:
    for fd, _ in poll.poll(2000):
        if fd == lst.fileno():
            down, _ = lst.accept()
            head = exact(down, 4); i = struct.unpack("!I", head)[0]
            body = exact(down, 2 * (i % 100))
            up = socket.socket(); up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, @MARK@)
            up.connect(("203.0.113.10", 17000 + k))
            s, _ = srv.accept()
            up.sendall(head + body); exact(s, 4 + 2 * (i % 100))
            s.sendall(b"d" * (i // 100 + 1)); down.sendall(exact(up, i // 100 + 1))
            pairs[down.fileno()] = (down, up); servers.append(s)
        else:
            line = sys.stdin.readline().split()
            if not line or line[0] == "close":
                running = False
            elif line[0] == "count":
                print("COUNT", len(pairs), flush=True)
for s in servers: s.close()
servers.clear()
for down, up in pairs.values():
    assert up.recv(1) == b""
    down.shutdown(socket.SHUT_WR)
ep = select.epoll(sizehint=len(pairs))
for fd in pairs: ep.register(fd, select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)
print("FORWARDED", len(pairs), flush=True)
closed = 0
for _ in range(100000):
    events = ep.poll(1.0)
    for fd, _ in events:
        down, up = pairs.pop(fd)
        ep.unregister(fd); up.close(); down.close(); closed += 1
""".replace("@MARK@", str(MARK))

APP = r"""
import socket, struct, sys
first, n = int(sys.argv[1]), int(sys.argv[2])
conns = []
for i in range(first, first + n):
    s = socket.socket(); s.bind(("192.0.2.10", 0))
    s.connect(("203.0.113.10", 7777))
    s.sendall(struct.pack("!I", i) + b"u" * (2 * (i % 100)))
    conns.append(s)
print("READY", flush=True)
for line in sys.stdin:
    if line.strip() == "close":
        for s in conns:
            while s.recv(4096): pass  # unread data would make close() send an RST, not the FIN
            s.close()
        conns.clear()
        print("CLOSED", flush=True)
"""


def run(*argv: str, netns: str | None = None) -> str:
    cmd = [IP, "netns", "exec", netns, *argv] if netns else list(argv)
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout


class Proc:
    def __init__(self, netns: str, script: str, *args: str) -> None:
        self.p = subprocess.Popen(
            [IP, "netns", "exec", netns, sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def send(self, line: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def expect(self, token: str, timeout: float = 120.0) -> str:
        assert self.p.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"fixture process exited before {token}")
            if line.startswith(token):
                return line.strip()
        raise TimeoutError(token)

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(timeout=10)


def _nat_lines(netns: str) -> list[str] | None:
    """Live conntrack entries of connections to the redirected service.

    None when the dump failed: a dump the table's churn interrupted is partial,
    and an empty partial answer must not pass for "all expired".
    """
    done = subprocess.run(
        [IP, "netns", "exec", netns, "conntrack", "-L", "-p", "tcp", "--dport", "7777"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return done.stdout.splitlines() if done.returncode == 0 else None


def _loss(netns: str) -> str:
    """The retransmission counters of the netns, for a failure message."""
    names = ("TcpRetransSegs", "TcpExtTCPLossProbes", "TcpOutRsts")
    out = subprocess.run(
        [IP, "netns", "exec", netns, "nstat", "-asz", *names],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    ).stdout
    got = {f[0]: f[1] for f in map(str.split, out.splitlines()) if len(f) > 1 and f[0] in names}
    return ", ".join(f"{k} {v}" for k, v in got.items()) or "no nstat"


def count(netns: str, *state: str) -> int:
    return len(run("ss", "-Htan", *state, netns=netns).splitlines())


@dataclass
class Leaks:
    netns: str
    leaks: int
    proxies: list[Proc]


@contextlib.contextmanager
def leaked_pairs(n: int, prefix: str = "hct") -> Iterator[Leaks]:
    """A netns named ``<prefix>-<hex>-leaks`` with ``n`` leaked pairs; removed on exit."""
    ns = f"{prefix}-{secrets.token_hex(3)}-leaks"
    procs: list[Proc] = []
    run(IP, "netns", "add", ns)
    try:
        for argv in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", "192.0.2.10/24", "dev", "lo"],
            ["ip", "addr", "add", "203.0.113.10/32", "dev", "lo"],
            ["sysctl", "-qw", "net.ipv4.ip_local_port_range=20000 65000"],
            ["sysctl", "-qw", "net.ipv4.tcp_fin_timeout=1"],
            ["sysctl", "-qw", "net.core.somaxconn=4096"],
            *capture_rules(),
            *(["sysctl", "-qw", f"net.netfilter.nf_conntrack_tcp_timeout_{t}"] for t in _TIMEOUTS),
        ):
            run(*argv, netns=ns)
        proxies = [Proc(ns, PROXY, str(k)) for k in range(-(-n // PER_PROXY))]
        procs += proxies
        for p in proxies:
            p.expect("READY")
        apps = []
        for first in range(0, n, PER_APP):
            apps.append(Proc(ns, APP, str(first), str(min(PER_APP, n - first))))
        procs += apps
        for a in apps:
            a.expect("READY", timeout=300)
        deadline = time.monotonic() + 300
        while True:  # every connection relayed (the app's connects outrun the proxies)
            for p in proxies:
                p.send("count")
            if sum(int(p.expect("COUNT").split()[1]) for p in proxies) >= n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("fixture: connections not relayed")
            time.sleep(0.2)
        for p in proxies:
            p.send("close")
        got = sum(int(p.expect("FORWARDED", timeout=300).split()[1]) for p in proxies)
        if got != n:
            raise RuntimeError(f"fixture relayed {got} connections, not {n}")
        # The NAT entries must all have expired before the app closes, or its
        # FIN still reaches the proxy.  Under load the last FIN/ACK exchange
        # can land well after FORWARDED, and a lost ACK means a retransmitted
        # FIN: wait until every FIN is acknowledged (no FIN_WAIT1: nothing
        # left to retransmit) and the table is empty (a dump skips expired
        # entries), then the delayed-ACK margin.
        time.sleep(1.0)
        deadline = time.monotonic() + 60
        while True:
            left, unacked = _nat_lines(ns), count(ns, "state", "fin-wait-1")
            if left == [] and not unacked:
                break
            if time.monotonic() > deadline:
                if left is None:
                    raise TimeoutError("fixture: conntrack -L of the NAT entries kept failing")
                if left:
                    states = sorted({line.split()[3] for line in left if len(line.split()) > 3})
                    raise TimeoutError(
                        f"fixture: {len(left)} NAT entries did not expire (states {states}; "
                        f"{_loss(ns)}); first: {left[0]}"
                    )
                raise TimeoutError(f"fixture: {unacked} FINs never acknowledged ({_loss(ns)})")
            time.sleep(0.2)
        time.sleep(0.3)
        for a in apps:
            a.send("close")
            a.expect("CLOSED")
        deadline = time.monotonic() + 60
        # Each side on its own: a sum could pass with a pair lost (an RST) and
        # a server's orphan still in FIN_WAIT2 (tcp_fin_timeout) in its place.
        while True:
            down = count(ns, "state", "fin-wait-2", "sport", "= :15001")
            up = count(ns, "state", "close-wait")
            if (down, up) == (n, n):
                break
            if time.monotonic() > deadline:
                summary = run("ss", "-Htan", netns=ns).split()[0::5]
                states = {st: summary.count(st) for st in set(summary)}
                raise TimeoutError(
                    f"fixture: {down} FIN_WAIT2 on :15001 and {up} CLOSE_WAIT, not {n} each: "
                    f"{states} ({_loss(ns)})"
                )
            time.sleep(0.5)
        for a in apps:
            a.close()
        yield Leaks(ns, n, proxies)
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                p.close()
        subprocess.run([IP, "netns", "del", ns], check=False, capture_output=True)


if __name__ == "__main__":
    with leaked_pairs(int(sys.argv[1]) if len(sys.argv) > 1 else 1000) as lk:
        print(
            lk.netns, count(lk.netns, "state", "fin-wait-2"), count(lk.netns, "state", "close-wait")
        )
