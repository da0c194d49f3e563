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

Istio's optional ``INVALID_DROP`` rule is deliberately absent from the pod:
the field report's tcpdump shows the app's late FIN leaving the pod's eth0,
so the drop happened outside (Calico on the node).  The lab models that with
``network_rules`` in the upstream netns (``LabSettings.drop_invalid``).
"""

from __future__ import annotations

from dataclasses import dataclass

from halfclose.lab.settings import MeshProfile
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


def pod_rules(mesh: MeshProfile, backend: str) -> RuleLoad:
    if backend == "nft":
        text = _NFT[mesh.name](mesh)
        return RuleLoad(("nft", "-f", "-"), text)
    text = _IPTABLES[mesh.name](mesh)
    # -w: iptables-legacy serialises on a host-wide lock that concurrent labs share.
    return RuleLoad((f"{backend}-restore", "-w", "5"), text)


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


_IPTABLES = {"istio": _istio_iptables, "linkerd": _linkerd_iptables}
_NFT = {"istio": _istio_nft, "linkerd": _linkerd_nft}
