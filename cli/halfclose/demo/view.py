"""The demo's side-by-side view: each proxy socket pair next to its NAT entry.

Rows are read from the kernel each time — one sock_diag dump of the pod netns
and a ctnetlink lookup per NAT reply tuple — for the connections the lab says
it made, so what the demo shows is what the kernel holds, independently of
the scanner's classification and pairing.
"""

from __future__ import annotations

from dataclasses import dataclass

from halfclose.agent.core.model import ConntrackEntry, FlowTuple, TcpState
from halfclose.agent.kernel.conntrack import Conntrack
from halfclose.agent.kernel.sockdiag import SockDiag
from halfclose.lab import ProxiedPair

GONE = "(gone)"


def reply_tuple(pair: ProxiedPair) -> FlowTuple:
    """The NAT entry's reply direction: proxy downstream -> app (docs/detection.md)."""
    down, app = pair.proxy_downstream, pair.app
    return FlowTuple(down.ip, down.port, app.ip, app.port)


@dataclass(frozen=True, slots=True)
class Row:
    downstream: TcpState | None  # the proxy's socket to the app (None: gone)
    upstream: TcpState | None  # the proxy's socket to the upstream (None: gone)
    entry: ConntrackEntry | None  # the pod's NAT entry (None: expired / gone)


class Viewer:
    def __init__(self, diag: SockDiag, conntrack: Conntrack) -> None:
        self._diag = diag
        self._ct = conntrack

    def observe(self, pairs: tuple[ProxiedPair, ...]) -> list[Row]:
        _, sockets = self._diag.dump(list(TcpState))
        by_tuple = {(str(s.local), str(s.peer)): s.state for s in sockets}
        by_local = {str(s.local): s.state for s in sockets}
        return [
            Row(
                by_tuple.get((str(p.proxy_downstream), str(p.app))),
                by_local.get(str(p.proxy_upstream)),
                self._ct.get_by_reply(reply_tuple(p)),
            )
            for p in pairs
        ]


def _entry_text(entry: ConntrackEntry | None) -> str:
    if entry is None:
        return "none: expired, the app's FIN can't be NATed"
    return f"{entry.tcp_state}, {entry.timeout} s left"


def _state(state: TcpState | None) -> str:
    return state.ss_name if state is not None else GONE


def render(pairs: tuple[ProxiedPair, ...], rows: list[Row]) -> str:
    header = (
        "proxy socket to the app",
        "proxy socket to the upstream",
        "pod's NAT entry (conntrack)",
    )
    lines = [
        (
            f"{_state(r.downstream):<10} {p.proxy_downstream} <-> {p.app}",
            f"{_state(r.upstream):<10} {p.proxy_upstream} -> upstream",
            _entry_text(r.entry),
        )
        for p, r in zip(pairs, rows, strict=True)
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header).rstrip(), "-+-".join("-" * w for w in widths)]
    out.extend(fmt.format(*line).rstrip() for line in lines)
    return "\n".join(out)
