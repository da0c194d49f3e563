"""What the lab hands back: connection identities and status (plain data)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from halfclose.agent.core.model import Endpoint
from halfclose.lab.settings import LabSettings


@dataclass(frozen=True, slots=True)
class ProxiedPair:
    """One app connection through the sidecar, by its three endpoints.

    ``app`` is the app's socket (pod-ip:ephemeral), ``proxy_downstream`` the
    proxy's socket facing it (127.0.0.1:<outbound capture port>, the
    REDIRECT target) and ``proxy_upstream`` the local end of the proxy's own
    connection to the upstream service (pod-ip:ephemeral).
    """

    app: Endpoint
    proxy_downstream: Endpoint
    proxy_upstream: Endpoint


# What ``Lab.leak`` returns: the proxy's two sockets of each pair are leaked.
LeakedPair = ProxiedPair


@dataclass(frozen=True, slots=True)
class LateClose:
    """Connections half-closed now whose app closes by itself at ``closes_at`` (epoch s)."""

    pod: int
    batch: int
    pairs: tuple[ProxiedPair, ...]
    closes_at: float
    inbound: bool = False  # made by the pod's inbound clients (``late_close(inbound=True)``)


@dataclass(frozen=True, slots=True)
class SocketView:
    """One TCP socket as ``ss -tan[p]`` shows it (strings as ss spells them)."""

    state: str
    local: str
    peer: str
    process: str | None = None
    pid: int | None = None

    @property
    def local_port(self) -> int:
        return int(self.local.rpartition(":")[2])

    @property
    def peer_port(self) -> int | None:
        port = self.peer.rpartition(":")[2]
        return int(port) if port.isdigit() else None


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    role: str  # "upstream" | "proxy" | "app"
    pod: int | None
    pid: int
    alive: bool
    uid: int | None = None


@dataclass(frozen=True, slots=True)
class PodStatus:
    index: int
    netns: str
    ip: str
    exists: bool
    close_wait_timeout: int | None  # the pod netns's sysctl as read now
    proxy: ProcessInfo | None
    app: ProcessInfo | None
    sockets_by_state: dict[str, int] = field(default_factory=dict)
    # The proxy's sockets (capture ports and its upstream dials), LISTEN excluded.
    proxy_sockets: tuple[SocketView, ...] = ()
    app_held: dict[str, Any] | None = None  # the holder's own count, if it runs


@dataclass(frozen=True, slots=True)
class LabStatus:
    prefix: str
    exists: bool
    phase: str | None  # "building" | "up" | None
    settings: LabSettings | None
    capture_ports: tuple[int, int] | None
    upstream_netns: str | None
    upstream: ProcessInfo | None
    pods: tuple[PodStatus, ...] = ()
    stray_netns: tuple[str, ...] = ()  # lab-named namespaces with no state recorded

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Teardown:
    """What ``Lab.down`` removed."""

    netns: tuple[str, ...]
    processes: tuple[int, ...]
    state_dir_removed: bool

    @property
    def anything(self) -> bool:
        return bool(self.netns or self.processes or self.state_dir_removed)
