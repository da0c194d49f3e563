"""The NAT rules of each mesh style, rendered for each backend (pure).

Each style mimics what the mesh's init container installs, chain names and
all, so the scanner's capture-port detection is tested against rules that
look like the real thing:

- ``istio``: istio-iptables' ISTIO_OUTPUT / ISTIO_REDIRECT / ISTIO_INBOUND /
  ISTIO_IN_REDIRECT chains, Envoy's uid and gid 1337 exempted, outbound
  REDIRECT to 15001, inbound (arriving on eth0) REDIRECT to 15006.  The nft
  backend mirrors Istio's native nftables mode (table ``inet istio-proxy-nat``).
- ``linkerd``: proxy-init's PROXY_INIT_OUTPUT / PROXY_INIT_REDIRECT chains
  with its rule comments, uid 2102 exempted, 4140 out, 4143 in.
- ``istio-tproxy``: istio-iptables with ``interceptionMode: TPROXY``: outbound
  REDIRECT as ``istio``; inbound in the mangle table (ISTIO_INBOUND /
  ISTIO_DIVERT / ISTIO_TPROXY, ``TPROXY --on-port 15006 --tproxy-mark 1337``)
  with policy routing (``fwmark 1337 lookup 133``, ``local default dev lo``).
  Envoy's inbound dials come from 127.0.0.6 over lo, which is exempt.
- ``ambient``: the in-pod rules istio-cni writes into the app pod's netns
  (cni/pkg/iptables/iptables.go, AppendInpodRules): ISTIO_PRERT / ISTIO_OUTPUT
  in mangle and nat, everything marked 0x539/0xfff (ztunnel's SO_MARK) exempt,
  outbound REDIRECT to 15001, inbound REDIRECT to 15006 except HBONE's 15008,
  UDP DNS to 15053 (a UDP rule: 15053 is no TCP capture port), the connmark
  0x111 save/restore, and the ``fwmark 0x111/0xfff lookup 100`` rule with its
  local route.  The health-probe SNAT address 169.254.7.127 is accepted.

Istio's optional ``INVALID_DROP`` rule is absent from the pod by default: the
field report's tcpdump shows the app's late FIN leaving the pod's eth0, so the
drop happened outside (Calico on the node).  The lab models that with
``network_rules`` in the upstream netns (``LabSettings.drop_invalid``).  With
``LabSettings.pod_drop_invalid`` the pod gets Istio's rule itself (mangle
PREROUTING, first): the one capture without NAT, TPROXY, then leaks too.
"""

from __future__ import annotations

from dataclasses import dataclass

from halfclose.lab.settings import TPROXY_MARK, TPROXY_TABLE, MeshProfile
from halfclose.lab.topology import POD_DEVICE


@dataclass(frozen=True, slots=True)
class RuleLoad:
    """Run ``argv`` inside the netns with ``text`` on stdin (one atomic load)."""

    argv: tuple[str, ...]
    text: str


def tools_for(backend: str) -> tuple[str, ...]:
    """Executables a backend needs (checked before a lab is built)."""
    if backend == "nft":
        return ("nft",)
    return (f"{backend}-restore", f"{backend}-save")


def pod_rules(mesh: MeshProfile, backend: str, *, drop_invalid: bool = False) -> RuleLoad:
    if backend == "nft":
        text = _NFT[mesh.name](mesh)
        if drop_invalid:
            text += _nft_drop_invalid(mesh)
        return RuleLoad(("nft", "-f", "-"), text)
    text = _IPTABLES[mesh.name](mesh)
    if drop_invalid or mesh.name in _MANGLE:
        text = _mangle_table(mesh, drop_invalid) + text
    # -w: iptables-legacy serialises on a host-wide lock that concurrent labs share.
    return RuleLoad((f"{backend}-restore", "-w", "5"), text)


def pod_routes(mesh: MeshProfile) -> list[str]:
    """``ip -batch`` lines of the policy routing a style needs in the pod (may be none)."""
    if mesh.inbound_tproxy:
        # istio-iptables: marked (diverted) packets are delivered locally.
        return [
            f"rule add fwmark {TPROXY_MARK} lookup {TPROXY_TABLE}",
            f"route add local 0.0.0.0/0 dev lo table {TPROXY_TABLE}",
        ]
    if mesh.name == "ambient":
        # istio-cni's AddInpodMarkIPRule / AddLoopbackRoutes.
        return [
            f"rule add fwmark {_AMBIENT_TPROXY_MARK} pref 32764 lookup {_AMBIENT_TABLE}",
            f"route add local 0.0.0.0/0 dev lo table {_AMBIENT_TABLE}",
        ]
    return []


def network_rules(backend: str) -> RuleLoad:
    """The network side drops what conntrack calls INVALID, as Calico's felix does."""
    if backend == "nft":
        return RuleLoad(
            ("nft", "-f", "-"),
            "table inet lab-network {\n"
            "\tchain input {\n"
            "\t\ttype filter hook input priority filter; policy accept;\n"
            "\t\tct state invalid drop\n"
            "\t}\n"
            "}\n",
        )
    return RuleLoad(
        (f"{backend}-restore", "-w", "5"),
        "*filter\n"
        ":INPUT ACCEPT [0:0]\n"
        ":FORWARD ACCEPT [0:0]\n"
        ":OUTPUT ACCEPT [0:0]\n"
        '-A INPUT -m conntrack --ctstate INVALID -m comment --comment "lab-network: '
        'drop INVALID like the CNI" -j DROP\n'
        "COMMIT\n",
    )


def _nat_header(*chains: str) -> list[str]:
    return [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        *(f":{chain} - [0:0]" for chain in chains),
    ]


def _istio_iptables(mesh: MeshProfile) -> str:
    uid = mesh.proxy_uid
    lines = [
        *_nat_header("ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT"),
        f"-A PREROUTING -i {POD_DEVICE} -p tcp -j ISTIO_INBOUND",
        "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
        # Envoy's own admin/health ports are never redirected, as in Istio.
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
        f"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {mesh.inbound_port}",
        # The owner exemption: the proxy's own upstream connections leave as is.
        f"-A ISTIO_OUTPUT -m owner --uid-owner {uid} -j RETURN",
        f"-A ISTIO_OUTPUT -m owner --gid-owner {uid} -j RETURN",
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
        f"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {mesh.outbound_port}",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def _linkerd_iptables(mesh: MeshProfile) -> str:
    def comment(text: str) -> str:
        return f'-m comment --comment "proxy-init/{text}"'

    lines = [
        *_nat_header("PROXY_INIT_OUTPUT", "PROXY_INIT_REDIRECT"),
        f"-A PREROUTING -i {POD_DEVICE} {comment('install-proxy-init-prerouting')} "
        "-j PROXY_INIT_REDIRECT",
        f"-A OUTPUT {comment('install-proxy-init-output')} -j PROXY_INIT_OUTPUT",
        f"-A PROXY_INIT_OUTPUT -m owner --uid-owner {mesh.proxy_uid} "
        f"{comment('ignore-proxy-user-id')} -j RETURN",
        f"-A PROXY_INIT_OUTPUT -o lo {comment('ignore-loopback')} -j RETURN",
        f"-A PROXY_INIT_OUTPUT -p tcp {comment('redirect-all-outgoing-to-proxy-port')} "
        f"-j REDIRECT --to-ports {mesh.outbound_port}",
        f"-A PROXY_INIT_REDIRECT -p tcp -m multiport --dports 4190,4191 "
        f"{comment('ignore-port-4190,4191')} -j RETURN",
        f"-A PROXY_INIT_REDIRECT -p tcp {comment('redirect-all-incoming-to-proxy-port')} "
        f"-j REDIRECT --to-ports {mesh.inbound_port}",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def _nft_table(name: str, prerouting: str, output: str, chains: dict[str, list[str]]) -> str:
    out = [f"table inet {name} {{"]
    out += [
        "\tchain prerouting {",
        "\t\ttype nat hook prerouting priority dstnat; policy accept;",
        f'\t\tiifname "{POD_DEVICE}" meta l4proto tcp jump {prerouting}',
        "\t}",
        "\tchain output {",
        "\t\ttype nat hook output priority -100; policy accept;",
        f"\t\tmeta l4proto tcp jump {output}",
        "\t}",
    ]
    for chain, rules in chains.items():
        out.append(f"\tchain {chain} {{")
        out += [f"\t\t{rule}" for rule in rules]
        out.append("\t}")
    out.append("}")
    return "\n".join(out) + "\n"


def _istio_nft(mesh: MeshProfile) -> str:
    uid = mesh.proxy_uid
    return _nft_table(
        "istio-proxy-nat",
        prerouting="istio-inbound",
        output="istio-output",
        chains={
            "istio-inbound": [
                "tcp dport { 15020, 15021, 15090 } return",
                "meta l4proto tcp jump istio-in-redirect",
            ],
            "istio-in-redirect": [f"meta l4proto tcp redirect to :{mesh.inbound_port}"],
            "istio-output": [
                f"meta skuid {uid} return",
                f"meta skgid {uid} return",
                "ip daddr 127.0.0.1 return",
                "jump istio-redirect",
            ],
            "istio-redirect": [f"meta l4proto tcp redirect to :{mesh.outbound_port}"],
        },
    )


def _linkerd_nft(mesh: MeshProfile) -> str:
    return _nft_table(
        "linkerd-proxy-init",
        prerouting="proxy-init-redirect",
        output="proxy-init-output",
        chains={
            "proxy-init-output": [
                f"meta skuid {mesh.proxy_uid} return",
                'oifname "lo" return',
                f"meta l4proto tcp redirect to :{mesh.outbound_port}",
            ],
            "proxy-init-redirect": [
                "tcp dport { 4190, 4191 } return",
                f"meta l4proto tcp redirect to :{mesh.inbound_port}",
            ],
        },
    )


# Istio's DROP_INVALID (istio-iptables --drop-invalid / INVALID_DROP=true).
_DROP_INVALID = "-A PREROUTING -m conntrack --ctstate INVALID -j DROP"
_AMBIENT_MARK = "0x539/0xfff"  # ztunnel's SO_MARK (istio-cni InpodMark/InpodMask)
_AMBIENT_TPROXY_MARK = "0x111/0xfff"  # InpodTProxyMark/InpodTProxyMask
_AMBIENT_TABLE = 100  # RouteTableInbound
_PROBE_SNAT = "169.254.7.127/32"  # HostProbeSNATAddress


def _mangle_header(*chains: str) -> list[str]:
    return [
        "*mangle",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        *(f":{chain} - [0:0]" for chain in chains),
    ]


def _mangle_table(mesh: MeshProfile, drop_invalid: bool) -> str:
    rules = _MANGLE.get(mesh.name, lambda _m: ([], []))(mesh)
    chains, body = rules
    # First in PREROUTING, as istio-iptables writes it: before any TPROXY
    # rule, which would otherwise hand the stray packet to its socket.
    lines = [*_mangle_header(*chains), *([_DROP_INVALID] if drop_invalid else []), *body, "COMMIT"]
    return "\n".join(lines) + "\n"


def _istio_tproxy_mangle(mesh: MeshProfile) -> tuple[list[str], list[str]]:
    mark = TPROXY_MARK
    chains = ["ISTIO_DIVERT", "ISTIO_INBOUND", "ISTIO_TPROXY"]
    body = [
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        f"-A ISTIO_DIVERT -j MARK --set-xmark {hex(mark)}/0xffffffff",
        "-A ISTIO_DIVERT -j ACCEPT",
        f"-A ISTIO_INBOUND -p tcp -m mark --mark {hex(mark)} -j RETURN",
        # Envoy's inbound dials to the app leave from 127.0.0.6 over lo.
        "-A ISTIO_INBOUND -s 127.0.0.6/32 -i lo -p tcp -j RETURN",
        "-A ISTIO_INBOUND -i lo -p tcp -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT",
        "-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY",
        f"-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port {mesh.inbound_port} "
        f"--on-ip 0.0.0.0 --tproxy-mark {hex(mark)}/0xffffffff",
    ]
    return chains, body


def _ambient_mangle(mesh: MeshProfile) -> tuple[list[str], list[str]]:
    return ["ISTIO_PRERT", "ISTIO_OUTPUT"], [
        "-A PREROUTING -j ISTIO_PRERT",
        "-A OUTPUT -j ISTIO_OUTPUT",
        f"-A ISTIO_PRERT -m mark --mark {_AMBIENT_MARK} -j CONNMARK --set-xmark "
        f"{_AMBIENT_TPROXY_MARK}",
        f"-A ISTIO_OUTPUT -m connmark --mark {_AMBIENT_TPROXY_MARK} -j CONNMARK "
        "--restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
    ]


def _istio_tproxy_iptables(mesh: MeshProfile) -> str:
    """The nat half of TPROXY mode: outbound REDIRECT only (inbound is in mangle)."""
    uid = mesh.proxy_uid
    lines = [
        *_nat_header("ISTIO_OUTPUT", "ISTIO_REDIRECT"),
        "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
        "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
        f"-A ISTIO_OUTPUT -m owner --uid-owner {uid} -j RETURN",
        f"-A ISTIO_OUTPUT -m owner --gid-owner {uid} -j RETURN",
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A ISTIO_OUTPUT -o lo -j RETURN",
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
        f"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {mesh.outbound_port}",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def _ambient_iptables(mesh: MeshProfile) -> str:
    """istio-cni's in-pod nat rules (the mangle half is in ``_ambient_mangle``)."""
    hbone = mesh.extra_ports[0]
    lines = [
        *_nat_header("ISTIO_PRERT", "ISTIO_OUTPUT"),
        "-A PREROUTING -j ISTIO_PRERT",
        "-A OUTPUT -j ISTIO_OUTPUT",
        f"-A ISTIO_PRERT -s {_PROBE_SNAT} -p tcp -m tcp -j ACCEPT",
        f"-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport {hbone} "
        f"-m mark ! --mark {_AMBIENT_MARK} -j REDIRECT --to-ports {mesh.inbound_port}",
        f"-A ISTIO_OUTPUT -d {_PROBE_SNAT} -p tcp -m tcp -j ACCEPT",
        f"-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark {_AMBIENT_MARK} -m udp --dport 53 "
        "-j REDIRECT --to-ports 15053",
        f"-A ISTIO_OUTPUT -p tcp -m mark --mark {_AMBIENT_TPROXY_MARK} -j ACCEPT",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT",
        f"-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark {_AMBIENT_MARK} "
        f"-j REDIRECT --to-ports {mesh.outbound_port}",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def _nft_drop_invalid(mesh: MeshProfile) -> str:
    """Istio's DROP_INVALID in its native nftables mode (a mangle-priority chain)."""
    name = "istio-proxy-mangle" if mesh.name.startswith("istio") else f"{mesh.name}-drop-invalid"
    return (
        f"table inet {name} {{\n"
        "\tchain prerouting {\n"
        "\t\ttype filter hook prerouting priority mangle; policy accept;\n"
        "\t\tct state invalid drop\n"
        "\t}\n"
        "}\n"
    )


_IPTABLES = {
    "istio": _istio_iptables,
    "istio-tproxy": _istio_tproxy_iptables,
    "linkerd": _linkerd_iptables,
    "ambient": _ambient_iptables,
}
_MANGLE = {"istio-tproxy": _istio_tproxy_mangle, "ambient": _ambient_mangle}
_NFT = {"istio": _istio_nft, "linkerd": _linkerd_nft}
