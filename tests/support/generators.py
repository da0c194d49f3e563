"""The meshes' own rule generators, run in scratch pods, with a tiny proxy to leak through.

``hack/mesh-generators.sh`` builds istio-iptables, istio-cni's in-pod rule code
and Linkerd's proxy-init from the Go module proxy (``make mesh-tools``); tests
skip with that instruction when a binary is missing.

A *pod* here is two network namespaces joined by a veth: the pod's own
(192.0.2.10, 2001:db8::10) and a remote host's (192.0.2.20, 2001:db8::20).
Istio's rules leave loopback traffic alone, so the far end of a connection has
to be really remote.  Generators run only inside the pod netns
(``ip netns exec``): every rule, route and address they write lands there.

The proxy plays the sidecar: it accepts on the outbound and inbound capture
ports, reads the original destination, dials it as the mesh exempts its proxy
(uid 1337 for Istio, 2102 for Linkerd, SO_MARK 0x539 for ztunnel) and relays a
few bytes.  A leak is then formed as in production: the server side closes, the
proxy forwards the FIN, the conntrack entry expires in CLOSE_WAIT, and the
client's late FIN no longer finds the NAT mapping.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.scratchnet import IP, Holder, kill_netns_pids, run, skip_unless_root, unique_name

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "mesh-generators.sh"

POD4, REMOTE4 = "192.0.2.10", "192.0.2.20"
POD6, REMOTE6 = "2001:db8::10", "2001:db8::20"
SERVICE_PORT = 7777  # the remote server (outbound connections)
APP_PORT = 8080  # the app's server in the pod (inbound connections)


def generator(name: str) -> Path:
    """The cached binary of generator ``name``, or a skip saying how to build it."""
    out = subprocess.run(
        ["bash", str(SCRIPT), "--path", name], capture_output=True, text=True, check=True
    )
    path = Path(out.stdout.strip())
    if not path.is_file():
        pytest.skip(f"{name} is not built: run `make mesh-tools` (needs Go and the module proxy)")
    return path


@dataclass
class Pod:
    netns: str
    remote: str

    def run(self, *argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(*map(str, argv), netns=self.netns, check=check)

    def generate(self, binary: Path, *args: str) -> str:
        """Run a generator in the pod netns; its output, or a failure with it."""
        proc = subprocess.run(
            [IP, "netns", "exec", self.netns, str(binary), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"{binary.name} {' '.join(args)}: exit {proc.returncode}\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc.stdout + proc.stderr


@contextlib.contextmanager
def pod(tag: str) -> Iterator[Pod]:
    """A pod netns wired to a remote netns; both are deleted on exit, failure included."""
    skip_unless_root("iptables", "ip6tables", "nft", "conntrack", "ss")
    name = unique_name(tag)
    made: list[str] = []
    try:
        for ns in (name, f"{name}-r"):
            run(IP, "netns", "add", ns)
            made.append(ns)
            run(IP, "link", "set", "lo", "up", netns=ns)
        # Made inside the namespaces: no host-side interface name to collide on.
        veth = ("veth", "peer", "name", "eth0", "netns", f"{name}-r")
        run(IP, "link", "add", "eth0", "netns", name, "type", *veth)
        for ns, v4, v6 in ((name, POD4, POD6), (f"{name}-r", REMOTE4, REMOTE6)):
            run(IP, "addr", "add", f"{v4}/24", "dev", "eth0", netns=ns)
            run(IP, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad", netns=ns)
            run(IP, "link", "set", "eth0", "up", netns=ns)
        yield Pod(name, f"{name}-r")
    finally:
        for ns in made:
            kill_netns_pids(ns)
            subprocess.run([IP, "netns", "del", ns], check=False, capture_output=True)


# --- the proxy, the client and the server ----------------------------------

_COMMON = r"""
import json, os, select, socket, struct, sys
def ep(a): return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"
def exact(s, n):
    b = b""
    while len(b) < n:
        d = s.recv(n - len(b))
        if not d: raise EOFError
        b += d
    return b
"""

PROXY = (
    _COMMON
    + r"""
fam = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
ports, uid, mark = json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4], 0)
transparent = sys.argv[5] == "1"    # a TPROXY listener: accepted sockets keep the original dst
listeners = {}
for port in ports:
    s = socket.socket(fam)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if transparent: s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
    if fam == socket.AF_INET6: s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", port)); s.listen(64)
    listeners[s] = port
if uid:  # the mesh exempts its proxy by uid: become it (the sockets are bound)
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
conns = []
print("READY", flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "relay":              # one connection: upstream = original dst (or the app)
        ready, _, _ = select.select(list(listeners), [], [], 10)
        down, _ = ready[0].accept()
        if transparent:
            dst = down.getsockname()[:2]
        elif fam == socket.AF_INET:
            port, ip = struct.unpack_from("!2xH4s", down.getsockopt(socket.SOL_IP, 80, 16))
            dst = (socket.inet_ntoa(ip), port)
        else:
            raw = down.getsockopt(socket.IPPROTO_IPV6, 80, 28)
            port, ip = struct.unpack_from("!2xH4x16s", raw)[0], raw[8:24]
            dst = (socket.inet_ntop(socket.AF_INET6, ip), port)
        if args and args[0] == "inbound":  # to the app in this pod, over loopback
            dst = ("::1" if fam == socket.AF_INET6 else "127.0.0.1", dst[1])
        up = socket.socket(fam)
        if mark: up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        up.settimeout(10); up.connect(dst)
        up.sendall(exact(down, 5)); down.sendall(exact(up, 5))
        conns.append((down, up))
        print(json.dumps({"local": ep(down.getsockname()), "peer": ep(down.getpeername()),
                          "up": ep(up.getsockname()), "dst": ep(dst)}), flush=True)
        print("OK", flush=True)
    elif cmd == "fin":              # the server closed: forward its FIN downstream
        down, up = conns[int(args[0])]
        up.settimeout(10)
        assert up.recv(1) == b""
        down.shutdown(socket.SHUT_WR)
        print("OK", flush=True)
"""
)

CLIENT = (
    _COMMON
    + r"""
conns = []
print("READY", flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "connect":
        s = socket.create_connection((args[0], int(args[1])), timeout=10)
        s.sendall(b"hello"); exact(s, 5)
        conns.append(s)
        print(ep(s.getsockname()), flush=True)
        print("OK", flush=True)
    elif cmd == "drain":            # the forwarded FIN arrives: CLOSE_WAIT here
        assert conns[int(args[0])].recv(1) == b""
        print("OK", flush=True)
    elif cmd == "close":            # the late FIN
        conns[int(args[0])].close()
        print("OK", flush=True)
"""
)

SERVER = (
    _COMMON
    + r"""
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
lst = socket.socket(fam); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind((sys.argv[1], int(sys.argv[2]))); lst.listen(64)
conns = []
print("READY", flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "accept":
        s, _ = lst.accept(); s.sendall(exact(s, 5)); conns.append(s)
        print("OK", flush=True)
    elif cmd == "close":
        conns[int(args[0])].close()
        print("OK", flush=True)
"""
)


def _holder(netns: str, script: str, *argv: str) -> Holder:
    code = f"import sys; sys.argv = {['x', *argv]!r}\n" + script
    return Holder(netns, code, hold=False)


@dataclass(frozen=True, slots=True)
class Conn:
    local: str  # the proxy's downstream socket (the capture port)
    peer: str  # the client's endpoint as the proxy sees it
    client: str  # the client's own endpoint


@dataclass
class Traffic:
    """A proxy in the pod, a client and a server placed by direction."""

    pod: Pod
    proxy: Holder
    holders: list[Holder] = field(default_factory=list)
    conns: list[Conn] = field(default_factory=list)

    def connection(
        self, client: Holder, server: Holder, dst: tuple[str, int], inbound: bool
    ) -> int:
        client.send(f"connect {dst[0]} {dst[1]}")
        self.proxy.send("relay inbound" if inbound else "relay")
        server.send("accept")
        server.expect("OK")
        (info,) = self.proxy.expect("OK")
        (client_ep,) = client.expect("OK")
        d = json.loads(info)
        self.conns.append(Conn(d["local"], d["peer"], client_ep))
        return len(self.conns) - 1

    def leak(self, i: int, client: Holder, server: Holder, timeout: float = 15.0) -> Conn:
        """Server closes, proxy forwards the FIN, the entry expires, the client closes late."""
        server.send(f"close {i}")
        server.expect("OK")
        self.proxy.send(f"fin {i}")
        self.proxy.expect("OK")
        client.send(f"drain {i}")
        client.expect("OK")
        port = self.conns[i].client.rpartition(":")[2]
        deadline = time.monotonic() + timeout
        while (
            f"={port} "
            in run("conntrack", "-L", "-p", "tcp", netns=self.pod.netns, check=False).stdout
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("the conntrack entry did not expire")
            time.sleep(0.2)
        client.send(f"close {i}")
        client.expect("OK")
        time.sleep(0.3)  # the late FIN goes out and finds no mapping
        return self.conns[i]

    def close(self) -> None:
        for h in (*self.holders, self.proxy):
            h.close()


@contextlib.contextmanager
def traffic(
    p: Pod,
    family: int,
    ports: Sequence[int],
    *,
    uid: int = 0,
    mark: int = 0,
    transparent: bool = False,
) -> Iterator[Traffic]:
    """A proxy on ``ports`` in the pod; CLOSE_WAIT entries there expire after 1 s.

    ``transparent``: the listeners take TPROXYed connections (IP_TRANSPARENT).
    """
    p.run("sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_close_wait=1")
    argv = (str(family), json.dumps(list(ports)), str(uid), hex(mark), str(int(transparent)))
    proxy = _holder(p.netns, PROXY, *argv)
    t = Traffic(p, proxy)
    try:
        yield t
    finally:
        t.close()


def outbound_pair(t: Traffic, family: int) -> tuple[Holder, Holder, tuple[str, int]]:
    """App client in the pod, server on the remote host."""
    remote = REMOTE6 if family == 6 else REMOTE4
    server = _holder(t.pod.remote, SERVER, remote, str(SERVICE_PORT))
    client = _holder(t.pod.netns, CLIENT)
    t.holders += [server, client]
    return client, server, (remote, SERVICE_PORT)


def inbound_pair(t: Traffic, family: int) -> tuple[Holder, Holder, tuple[str, int]]:
    """Client on the remote host, the app's server in the pod."""
    local = "::1" if family == 6 else "127.0.0.1"
    server = _holder(t.pod.netns, SERVER, local, str(APP_PORT))
    client = _holder(t.pod.remote, CLIENT)
    t.holders += [server, client]
    return client, server, (POD6 if family == 6 else POD4, APP_PORT)


def scan(p: Pod, *args: str) -> dict[str, object]:
    """``halfclose scan --output json`` of the pod netns, as a user runs it."""
    argv = [sys.executable, "-m", "halfclose", "scan", "--netns", p.netns, "--output", "json"]
    proc = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, object] = json.loads(proc.stdout)
    return doc
