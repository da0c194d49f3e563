"""The meshes' own rule generators, run in lab netns: detected capture ports and leaks.

Built from the Go module proxy by ``make mesh-tools`` (hack/mesh-generators.sh):
istio-iptables (sidecar: iptables-nft, iptables-legacy, --native-nftables;
IPv4 and --dual-stack; REDIRECT and TPROXY with --drop-invalid), istio-cni's
in-pod rules (ambient: the same three backends, IPv4 and IPv6) and Linkerd's
proxy-init (iptables-nft and legacy, IPv4 and IPv6).  Each runs only inside a
scratch pod netns.  The detected TCP capture ports must be exactly the mesh's,
and a leak formed through the generated rules must be exactly what
``halfclose scan`` reports.
"""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from halfclose.agent.kernel.natrules.capture import CapturePorts
from halfclose.agent.kernel.natrules.sources import detect as detect_rules
from halfclose.agent.kernel.netns import NetnsHandle
from support.generators import (
    Pod,
    generator,
    inbound_pair,
    outbound_pair,
    pod,
    scan,
    traffic,
)
from support.scratchnet import holder, run, scratch_netns, skip_unless_root, wait_for

pytestmark = pytest.mark.kernel

# The istio-init container's arguments as the sidecar injector writes them.
ISTIO = ("-p", "15001", "-z", "15006", "-u", "1337", "-i", "*", "-x", "", "-b", "*")
ISTIO_EXCLUDE = ("-d", "15090,15021,15020")
ISTIO_BACKEND = {
    "iptables-nft": ("--force-iptables-binary", "nft"),
    "iptables-legacy": ("--force-iptables-binary", "legacy"),
    "nft": ("--native-nftables",),
}
# Linkerd's proxy-init as the injector runs it (uid 2102), per firewall binary.
LINKERD = ("-p", "4143", "-o", "4140", "-u", "2102")


def linkerd_backend(backend: str, family: int) -> tuple[str, ...]:
    tool = {("iptables-nft", 4): "iptables-nft", ("iptables-legacy", 4): "iptables-legacy"}.get(
        (backend, family), f"ip6tables-{backend.split('-')[1]}"
    )
    return ("--firewall-bin-path", tool, "--firewall-save-bin-path", f"{tool}-save")


def sources(backend: str, family: int) -> set[str]:
    """The rule sources a backend writes to (nft's inet tables serve both families)."""
    if backend == "nft":
        return {"nft"}
    v4, v6 = backend, f"ip6tables-{backend.split('-')[1]}"
    return {v4, v6} if family == 6 else {v4}


def detect(p: Pod) -> CapturePorts:
    with NetnsHandle.from_name(p.netns) as handle:
        return detect_rules(handle)


def origin_sources(cp: CapturePorts, port: int) -> set[str]:
    return {o.source for o in cp.origins[port]}


def istio_sidecar(p: Pod, backend: str, family: int, *extra: str) -> None:
    dual = ("--dual-stack",) if family == 6 else ()
    p.generate(generator("istio-iptables"), *ISTIO, *ISTIO_EXCLUDE, *ISTIO_BACKEND[backend],
               *dual, *extra)  # fmt: skip


def istio_inpod(p: Pod, backend: str, family: int, *extra: str) -> None:
    ipv6 = ("-ipv6",) if family == 6 else ()
    p.generate(generator("istio-inpod"), "-backend", backend, *ipv6, *extra)


def linkerd(p: Pod, backend: str, family: int) -> None:
    p.generate(generator("linkerd-proxy-init"), *LINKERD, *linkerd_backend(backend, family))


# --- capture ports ----------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("backend", ["iptables-nft", "iptables-legacy", "nft"])
def test_istio_sidecar_redirect(backend: str, family: int) -> None:
    with pod("gis") as p:
        istio_sidecar(p, backend, family, "-m", "REDIRECT")
        cp = detect(p)
    assert cp.ports == {15001, 15006}
    assert cp.tproxy_ports == frozenset() and not cp.drops_invalid
    for port in (15001, 15006):
        assert origin_sources(cp, port) == sources(backend, family)


@pytest.mark.parametrize("backend", ["iptables-nft", "iptables-legacy", "nft"])
def test_istio_sidecar_tproxy_with_drop_invalid(backend: str) -> None:
    with pod("git") as p:
        istio_sidecar(p, backend, 4, "-m", "TPROXY")
        without = detect(p)
    with pod("gid") as p:
        istio_sidecar(p, backend, 4, "-m", "TPROXY", "--drop-invalid")
        cp = detect(p)
    # Inbound goes by TPROXY to 15006; the proxy's own loopback calls to the pod's
    # IP are still REDIRECTed to 15006, so it is a NAT port too.
    for found in (without, cp):
        assert found.ports == {15001, 15006}
        assert found.tproxy_ports == {15006}
        assert any(o.is_tproxy for o in found.origins[15006])
    assert not without.drops_invalid
    assert cp.drops_invalid


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("backend", ["iptables-nft", "iptables-legacy"])
def test_linkerd_proxy_init(backend: str, family: int) -> None:
    with pod("gld") as p:
        linkerd(p, backend, family)
        cp = detect(p)
    assert cp.ports == {4140, 4143}
    assert cp.tproxy_ports == frozenset() and not cp.drops_invalid
    tool = linkerd_backend(backend, family)[1]
    assert origin_sources(cp, 4140) == origin_sources(cp, 4143) == {tool}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("backend", ["iptables-nft", "iptables-legacy", "nft"])
def test_istio_ambient_inpod(backend: str, family: int) -> None:
    with pod("gam") as p:
        istio_inpod(p, backend, family)
        cp = detect(p)
    # istio-cni redirects DNS to ztunnel's 15053 for UDP *and* TCP: the TCP rule
    # makes 15053 a TCP capture port (ztunnel's DNS proxy serves TCP there).
    assert cp.ports == {15001, 15006, 15053}
    assert cp.tproxy_ports == frozenset() and not cp.drops_invalid
    for port in cp.ports:
        assert origin_sources(cp, port) == sources(backend, family)


def test_istio_ambient_without_dns_capture() -> None:
    with pod("gan") as p:
        istio_inpod(p, "iptables-nft", 4, "-dns=false")
        assert detect(p).ports == {15001, 15006}


def test_istio_ambient_udp_dns_rule_alone_is_not_a_tcp_capture() -> None:
    """istio-cni's own UDP rule (-p udp --dport 53 -> 15053) with its TCP twin removed."""
    with pod("gau") as p:
        istio_inpod(p, "iptables-nft", 6)
        for tool in ("iptables", "ip6tables"):
            saved = p.run(f"{tool}-save").stdout.splitlines()
            udp = [ln for ln in saved if "-p udp" in ln and "--to-ports 15053" in ln]
            tcp = [ln for ln in saved if "-p tcp" in ln and "--to-ports 15053" in ln]
            assert len(udp) == 1 and len(tcp) == 1, saved
            p.run(tool, "-t", "nat", *_delete(tcp[0]))
        cp = detect(p)
    assert cp.ports == {15001, 15006}
    assert 15053 not in cp.origins


def _delete(rule: str) -> list[str]:
    """``-A CHAIN spec`` as iptables-save prints it -> ``-D CHAIN spec``."""
    words = shlex.split(rule)
    return ["-D", *words[1:]]


# --- leaks through the generated rules --------------------------------------

Case = tuple[str, str, int, str]  # mesh, backend, family, direction

LEAKS: list[Case] = [
    ("istio", "iptables-nft", 4, "outbound"),
    ("istio", "iptables-nft", 4, "inbound"),
    ("istio", "iptables-legacy", 4, "outbound"),
    ("istio", "nft", 4, "outbound"),
    ("istio", "nft", 4, "inbound"),
    ("istio", "iptables-nft", 6, "outbound"),
    ("istio", "nft", 6, "outbound"),
    ("istio", "iptables-legacy", 6, "outbound"),
    ("istio", "iptables-nft", 6, "inbound"),
    ("linkerd", "iptables-nft", 4, "outbound"),
    ("linkerd", "iptables-nft", 4, "inbound"),
    ("linkerd", "iptables-legacy", 4, "outbound"),
    ("linkerd", "iptables-nft", 6, "outbound"),
    ("linkerd", "iptables-legacy", 6, "inbound"),
    ("ambient", "iptables-nft", 4, "outbound"),
    ("ambient", "iptables-nft", 4, "inbound"),
    ("ambient", "nft", 4, "outbound"),
    ("ambient", "iptables-legacy", 6, "outbound"),
    ("ambient", "nft", 6, "inbound"),
]

CAPTURE = {"istio": (15001, 15006), "ambient": (15001, 15006), "linkerd": (4140, 4143)}


def _generate(p: Pod, mesh: str, backend: str, family: int) -> dict[str, Any]:
    """Write the mesh's rules; the proxy's identity as the rules exempt it."""
    if mesh == "istio":
        istio_sidecar(p, backend, family, "-m", "REDIRECT")
        return {"uid": 1337}
    if mesh == "linkerd":
        linkerd(p, backend, family)
        return {"uid": 2102}
    istio_inpod(p, backend, family)
    return {"mark": 0x539}  # ztunnel's SO_MARK


@pytest.mark.parametrize(("mesh", "backend", "family", "direction"), LEAKS)
def test_a_leak_through_the_generated_rules_is_found_exactly(
    mesh: str, backend: str, family: int, direction: str
) -> None:
    out_port, in_port = CAPTURE[mesh]
    with pod("glk") as p:
        identity = _generate(p, mesh, backend, family)
        with traffic(p, family, (out_port, in_port), **identity) as t:
            pair = outbound_pair if direction == "outbound" else inbound_pair
            client, server, dst = pair(t, family)
            inbound = direction == "inbound"
            leaking = t.connection(client, server, dst, inbound)
            healthy = t.connection(client, server, dst, inbound)  # stays ESTABLISHED
            conn = t.leak(leaking, client, server)
            doc = scan(p, "--processes")
    port = in_port if inbound else out_port
    assert conn.local.rpartition(":")[2] == str(port)
    assert t.conns[healthy].local != conn.local or t.conns[healthy].peer != conn.peer
    findings = doc["findings"]
    assert isinstance(findings, list)
    assert [(f["kind"], f["local"], f["peer"]) for f in findings] == [
        ("leaked", conn.local, conn.peer)
    ], findings
    assert findings[0]["pid"] == t.proxy.pid
    assert set(CAPTURE[mesh]) <= set(doc["capture_ports"])  # type: ignore[arg-type]


# --- the UDP-only rule (issue 9): 15053 is not a TCP capture port --------------

SERVER = r"""
import socket
lst = socket.socket(); lst.bind(("192.0.2.10", 15053)); lst.listen(8)
cli = socket.create_connection(("192.0.2.10", 15053)); srv, _ = lst.accept()
srv.sendall(b"x"); cli.recv(1)
srv.shutdown(socket.SHUT_WR)   # the server half-closes; the client stays silent
assert cli.recv(1) == b""
print(cli.getsockname()[1], flush=True)
"""


def test_a_direct_half_close_on_a_udp_only_capture_port_is_not_leaked() -> None:
    """istio-cni's DNS rule ``-p udp --dport 53 -j REDIRECT --to-ports 15053`` alone.

    A TCP server on 15053 half-closes a direct (un-NATed) connection; its entry
    expires; nothing about it is a leak.  Before the fix the UDP rule made 15053
    a capture port and the socket was reported leaked.
    """
    skip_unless_root("iptables", "conntrack")
    with scratch_netns("udp") as ns:
        run("ip", "addr", "add", "192.0.2.10/24", "dev", "lo", netns=ns)
        run("sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_close_wait=1", netns=ns)
        run("iptables", "-t", "nat", "-N", "ISTIO_OUTPUT", netns=ns)
        run("iptables", "-t", "nat", "-A", "OUTPUT", "-j", "ISTIO_OUTPUT", netns=ns)
        rule = "! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53"
        run("iptables", "-t", "nat", "-A", "ISTIO_OUTPUT", *rule.split(),
            "-j", "REDIRECT", "--to-ports", "15053", netns=ns)  # fmt: skip
        with holder(ns, SERVER) as h:
            (client_port,) = h.lines
            # The half-close's entry (CLOSE_WAIT) expires after 1 s.
            wait_for(
                lambda: (
                    f"sport={client_port} "
                    not in run("conntrack", "-L", "-p", "tcp", netns=ns, check=False).stdout
                ),
                timeout=15,
            )
            fin_wait2 = run("ss", "-Htan", "state", "fin-wait-2", netns=ns).stdout
            assert ":15053" in fin_wait2  # the server's socket is there to misjudge
            doc = scan(Pod(ns, ns))
    assert [f for f in doc["findings"] if f["kind"] == "leaked"] == []  # type: ignore[union-attr]
    assert doc["capture_ports"] == []


# --- TPROXY (istio-iptables -m TPROXY): leaks only with DROP_INVALID ---------


@pytest.mark.parametrize("drop_invalid", [True, False])
@pytest.mark.parametrize("backend", ["iptables-nft", "nft"])
def test_tproxy_inbound_leaks_at_the_original_port_only_with_drop_invalid(
    backend: str, drop_invalid: bool
) -> None:
    """The leaked socket is the connection's original local port (8080), not 15006.

    Without DROP_INVALID the client's late FIN is INVALID to conntrack but TPROXY
    still delivers it to the proxy's socket, which closes: nothing leaks.
    """
    extra = ("--drop-invalid",) if drop_invalid else ()
    with pod("gtp") as p:
        istio_sidecar(p, backend, 4, "-m", "TPROXY", *extra)
        with traffic(p, 4, (15001, 15006), uid=1337, transparent=True) as t:
            client, server, dst = inbound_pair(t, 4)
            leaking = t.connection(client, server, dst, inbound=True)
            t.connection(client, server, dst, inbound=True)  # stays ESTABLISHED
            conn = t.leak(leaking, client, server)
            fin_wait2 = run("ss", "-Htan", "state", "fin-wait-2", netns=p.netns).stdout
            doc = scan(p)
    assert conn.local == "192.0.2.10:8080"
    findings = doc["findings"]
    assert isinstance(findings, list)
    if drop_invalid:
        assert "192.0.2.10:8080" in fin_wait2
        assert [(f["kind"], f["local"], f["peer"]) for f in findings] == [
            ("leaked", conn.local, conn.peer)
        ], findings
    else:
        assert "192.0.2.10:8080" not in fin_wait2  # the FIN got through
        assert findings == []
