"""The demo's side-by-side view: each proxy socket pair next to its NAT entry.

Rows are read from the kernel each time (sock_diag by tuple *and cookie*,
ctnetlink by the NAT reply tuple), so what the demo shows is what the kernel
holds, not what the demo believes.
"""

from __future__ import annotations

from dataclasses import dataclass

from halfclose.agent.core.model import ConntrackEntry, Finding, SocketRecord, TcpState
from halfclose.agent.kernel.conntrack import Conntrack
from halfclose.agent.kernel.sockdiag import SockDiag

GONE = "(gone)"


@dataclass(frozen=True, slots=True)
class Tracked:
    """One leaked-or-at-risk connection: the proxy's two sockets."""

    downstream: SocketRecord
    upstream: SocketRecord | None

    @classmethod
    def from_finding(cls, f: Finding) -> Tracked:
        return cls(f.socket, f.upstream)


@dataclass(frozen=True, slots=True)
class Row:
    downstream: SocketRecord | None
    upstream: SocketRecord | None
    upstream_known: bool
    entry: ConntrackEntry | None

    @property
    def downstream_state(self) -> TcpState | None:
        return self.downstream.state if self.downstream else None

    @property
    def upstream_state(self) -> TcpState | None:
        return self.upstream.state if self.upstream else None


class Viewer:
    def __init__(self, diag: SockDiag, conntrack: Conntrack) -> None:
        self._diag = diag
        self._ct = conntrack

    def _get(self, record: SocketRecord | None) -> SocketRecord | None:
        if record is None:
            return None
        dumped = self._diag.get(record)
        return dumped.record if dumped else None

    def observe(self, tracked: list[Tracked]) -> list[Row]:
        return [
            Row(
                self._get(t.downstream),
                self._get(t.upstream),
                t.upstream is not None,
                self._ct.get_by_reply(t.downstream.nat_reply_tuple),
            )
            for t in tracked
        ]


def _sock_text(planned: SocketRecord | None, now: SocketRecord | None) -> str:
    if planned is None:
        return "(not paired)"
    where = f"{planned.local} <-> {planned.peer}"
    return f"{now.state.ss_name if now else GONE:<10} {where}"


def _entry_text(entry: ConntrackEntry | None) -> str:
    if entry is None:
        return "none: expired, the app's FIN can't be NATed"
    return f"{entry.tcp_state}, {entry.timeout} s left"


def render(tracked: list[Tracked], rows: list[Row]) -> str:
    header = (
        "proxy <-> app (FIN from upstream forwarded)",
        "proxy <-> upstream",
        "pod conntrack NAT entry",
    )
    lines = [
        (
            _sock_text(t.downstream, r.downstream),
            _sock_text(t.upstream, r.upstream),
            _entry_text(r.entry),
        )
        for t, r in zip(tracked, rows, strict=True)
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), "-+-".join("-" * w for w in widths)]
    out.extend(fmt.format(*line).rstrip() for line in lines)
    return "\n".join(out)
