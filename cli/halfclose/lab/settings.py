"""Typed settings of a lab, validated on construction (a bad LabSettings cannot exist)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from halfclose.lab.errors import LabError

DEFAULT_PREFIX = "hc-lab"
DEFAULT_RUN_DIR = "/run/halfclose/lab"

# Pod addresses are 192.0.2.10 + i inside one /24 (see topology.py).
MAX_PODS = 200
# One request's worth of connections; the proxy holds two sockets per
# connection and the per-process open-file limit here is 20,000.
MAX_COUNT = 5000
MAX_CLOSE_WAIT_TIMEOUT = 3600

# Short enough that "<prefix>-pod199" stays a readable netns name and the
# holder's control socket path stays far below the 108-byte sun_path limit.
_PREFIX = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,14}[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class MeshProfile:
    """What a service mesh's proxy looks like to the kernel.

    ``mark``: the SO_MARK the proxy puts on its own dials, which the rules
    exempt (ambient: 0x539) instead of its uid.  ``extra_ports``: further
    listeners that are never capture targets (ztunnel's HBONE :15008).
    ``node_proxy``: one proxy process per lab, in a netns of its own, that
    opens its sockets inside every pod's netns (ztunnel) instead of a
    sidecar per pod.  ``inbound_tproxy``: inbound capture is TPROXY (no NAT:
    the proxy listens IP_TRANSPARENT and accepted sockets keep the original
    local port), as in Istio's ``interceptionMode: TPROXY``.
    """

    name: str
    outbound_port: int
    inbound_port: int
    proxy_uid: int
    mark: int | None = None
    extra_ports: tuple[int, ...] = ()
    node_proxy: bool = False
    inbound_tproxy: bool = False

    @property
    def capture_ports(self) -> tuple[int, int]:
        return (self.outbound_port, self.inbound_port)

    @property
    def listen_ports(self) -> tuple[int, ...]:
        return (*self.capture_ports, *self.extra_ports)


# Istio's sidecar TPROXY mode marks diverted packets 1337 and routes them by table 133.
TPROXY_MARK = 1337
TPROXY_TABLE = 133
# Where inbound traffic goes in the pod (the app's own port, the original
# destination a TPROXY'd socket keeps as its local port).
INBOUND_APP_PORT = 8080

MESHES: dict[str, MeshProfile] = {
    # Envoy: outbound :15001, inbound :15006, runs as uid/gid 1337.
    "istio": MeshProfile("istio", outbound_port=15001, inbound_port=15006, proxy_uid=1337),
    # Envoy with interceptionMode TPROXY: outbound still REDIRECT, inbound TPROXY.
    "istio-tproxy": MeshProfile(
        "istio-tproxy", outbound_port=15001, inbound_port=15006, proxy_uid=1337, inbound_tproxy=True
    ),
    # linkerd2-proxy: outbound :4140, inbound :4143, runs as uid 2102.
    "linkerd": MeshProfile("linkerd", outbound_port=4140, inbound_port=4143, proxy_uid=2102),
    # Istio ambient: istio-cni's in-pod rules, ztunnel (root, another netns)
    # exempted by SO_MARK 0x539, listening dual-stack on 15001/15006/15008.
    "ambient": MeshProfile(
        "ambient",
        outbound_port=15001,
        inbound_port=15006,
        proxy_uid=0,
        mark=0x539,
        extra_ports=(15008,),
        node_proxy=True,
    ),
}
STYLES = tuple(MESHES)
BACKENDS = ("iptables-nft", "iptables-legacy", "nft")
# Styles whose rules the lab renders for iptables only (istio-cni's in-pod
# rules and istio-iptables' TPROXY mode are iptables rule sets).
IPTABLES_ONLY = ("ambient", "istio-tproxy")


def validate_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise LabError(
            f"bad lab prefix {prefix!r}: 1-16 of [a-z0-9-], starting and ending "
            "with a letter or digit"
        )
    return prefix


@dataclass(frozen=True, slots=True)
class LabSettings:
    """Everything that shapes a lab.

    ``drop_invalid`` puts a ``ct state invalid drop`` rule on the network side
    (the upstream netns), as Calico's felix does on the node: the app's late
    FIN, which conntrack no longer recognises, is then dropped on the way
    instead of drawing a RST from the upstream host, so the app's socket
    retransmits it in LAST-ACK exactly as in the field report.  The leak forms
    either way; see docs/lab.md.

    ``pod_drop_invalid`` is Istio's own DROP_INVALID inside the pod (mangle
    PREROUTING ``-m conntrack --ctstate INVALID -j DROP``): what makes a
    TPROXY capture leak, since there is no NAT to lose.  ``dual_stack`` makes
    the proxy listen on ``[::]`` with IPV6_V6ONLY=0 (IPv4 peers then appear
    as ``::ffff:a.b.c.d``); ambient's ztunnel always does.
    ``fin_wait_timeout`` also sets ``nf_conntrack_tcp_timeout_fin_wait`` in
    each pod (None: the kernel's default, 120 s).
    """

    prefix: str = DEFAULT_PREFIX
    pods: int = 1
    style: str = "istio"
    backend: str = "iptables-nft"
    close_wait_timeout: int = 5
    drop_invalid: bool = True
    proxy_idle_timeout: float | None = None
    run_dir: str = DEFAULT_RUN_DIR
    # Lab processes exit on their own after this long: a safety net for a lab
    # nobody took down, never reached in normal use.
    max_lifetime: float = 6 * 3600.0
    dual_stack: bool = False
    pod_drop_invalid: bool = False
    fin_wait_timeout: int | None = None

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)
        if not _is_int(self.pods) or not 1 <= self.pods <= MAX_PODS:
            raise LabError(f"bad pod count {self.pods!r}: 1..{MAX_PODS}")
        if self.style not in MESHES:
            raise LabError(f"bad style {self.style!r}: one of {', '.join(STYLES)}")
        if self.backend not in BACKENDS:
            raise LabError(f"bad backend {self.backend!r}: one of {', '.join(BACKENDS)}")
        if not _is_int(self.close_wait_timeout) or not (
            1 <= self.close_wait_timeout <= MAX_CLOSE_WAIT_TIMEOUT
        ):
            raise LabError(
                f"bad close_wait_timeout {self.close_wait_timeout!r}: whole seconds, "
                f"1..{MAX_CLOSE_WAIT_TIMEOUT}"
            )
        if self.style in IPTABLES_ONLY and self.backend == "nft":
            raise LabError(
                f"style {self.style!r} is laid with iptables: use backend iptables-nft "
                "or iptables-legacy"
            )
        if self.fin_wait_timeout is not None and (
            not _is_int(self.fin_wait_timeout)
            or not 1 <= self.fin_wait_timeout <= MAX_CLOSE_WAIT_TIMEOUT
        ):
            raise LabError(
                f"bad fin_wait_timeout {self.fin_wait_timeout!r}: whole seconds, "
                f"1..{MAX_CLOSE_WAIT_TIMEOUT}"
            )
        if self.proxy_idle_timeout is not None and not self.proxy_idle_timeout > 0:
            raise LabError(f"bad proxy idle timeout {self.proxy_idle_timeout!r}: > 0")
        if not self.run_dir.startswith("/"):
            raise LabError(f"bad run_dir {self.run_dir!r}: an absolute path")
        if not self.max_lifetime > 0:
            raise LabError(f"bad max_lifetime {self.max_lifetime!r}: > 0")

    @property
    def mesh(self) -> MeshProfile:
        return MESHES[self.style]

    @property
    def listens_dual_stack(self) -> bool:
        """The proxy binds ``[::]`` without V6ONLY (asked for, or ztunnel's way)."""
        return self.dual_stack or self.mesh.node_proxy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
