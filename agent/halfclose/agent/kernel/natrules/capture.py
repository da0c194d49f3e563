"""What a capture port is, where it came from, and one netns's view over all rule sources.

Shared by both parsers: port ranges, loopback DNAT addresses, and the chain graph
(which chains a jump/goto reaches from a hook).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# A wide range is almost certainly not a sidecar; refuse to blow it up into
# thousands of "capture ports" (which would make every socket a candidate).
MAX_RANGE = 64

TPROXY = "tproxy"  # PortOrigin.target (lower-cased) of a TPROXY capture

_PORT_RANGE = re.compile(r"^(\d+)(?:[-:](\d+))?$")


@dataclass(frozen=True, slots=True)
class PortOrigin:
    """Where a capture port was found: ``iptables-nft nat/ISTIO_REDIRECT REDIRECT``."""

    source: str
    table: str
    chain: str
    target: str

    def __str__(self) -> str:
        return f"{self.source} {self.table}/{self.chain} {self.target}"

    @property
    def is_tproxy(self) -> bool:
        return self.target.lower() == TPROXY


@dataclass(frozen=True, slots=True)
class CapturePorts:
    # TCP NAT capture ports: REDIRECT or DNAT to a local port (not TPROXY).
    ports: frozenset[int]
    # Every TCP capture port (NAT and TPROXY) -> the rules that make it one.
    origins: Mapping[int, tuple[PortOrigin, ...]] = field(default_factory=dict)
    sources_read: tuple[str, ...] = ()
    sources_failed: Mapping[str, str] = field(default_factory=dict)  # source -> why
    # Tools not installed in the netns's view: normal (node images differ), and
    # then that rule style cannot be in use there either.
    sources_missing: tuple[str, ...] = ()
    # TCP TPROXY target ports (mangle): no NAT, so only a proof together with
    # ``drops_invalid`` (docs/detection.md part 2: the late FIN is dropped as INVALID).
    tproxy_ports: frozenset[int] = frozenset()
    # A rule drops conntrack-INVALID TCP packets (Istio's DROP_INVALID).
    drops_invalid: bool = False

    @property
    def unreadable(self) -> Mapping[str, str]:
        """Sources that exist but could not be read: rules there are invisible to us."""
        return {k: v for k, v in self.sources_failed.items() if k not in self.sources_missing}


@dataclass(frozen=True, slots=True)
class RuleScan:
    """What one source's rules say: TCP captures, and whether INVALID TCP is dropped."""

    captures: tuple[tuple[int, PortOrigin], ...] = ()
    drops_invalid: bool = False


def expand(lo: int, hi: int | None) -> range:
    hi = lo if hi is None else hi
    if not (0 < lo <= hi <= 65535) or hi - lo >= MAX_RANGE:
        return range(0)
    return range(lo, hi + 1)


def port_range(text: str) -> range:
    m = _PORT_RANGE.match(text)
    if not m:
        return range(0)
    return expand(int(m.group(1)), int(m.group(2)) if m.group(2) else None)


def reachable(
    roots: Iterable[str], edges: Mapping[str, list[tuple[bool, str]]], *, only_unconditional: bool
) -> set[str]:
    """Chains reached from ``roots`` by jump/goto (edges: chain -> [(conditional, target)])."""
    seen = set(roots)
    todo = list(seen)
    while todo:
        for conditional, target in edges.get(todo.pop(), ()):
            if (conditional and only_unconditional) or target in seen:
                continue
            seen.add(target)
            todo.append(target)
    return seen


def is_local(addr: str) -> bool:
    """A DNAT address (or range ``a-b``) that only ever means this host's loopback."""
    try:
        return all(ipaddress.ip_address(a).is_loopback for a in addr.split("-"))
    except ValueError:
        return False


def merge(found: Iterable[tuple[int, PortOrigin]]) -> dict[int, tuple[PortOrigin, ...]]:
    origins: dict[int, list[PortOrigin]] = {}
    for port, origin in found:
        seen = origins.setdefault(port, [])
        if origin not in seen:
            seen.append(origin)
    return {p: tuple(o) for p, o in sorted(origins.items())}


def combine(
    scans: Iterable[RuleScan],
    sources_read: tuple[str, ...] = (),
    sources_failed: Mapping[str, str] | None = None,
    sources_missing: tuple[str, ...] = (),
) -> CapturePorts:
    """One netns's view over all its rule sources: NAT ports apart from TPROXY ports."""
    scans = list(scans)
    origins = merge(c for s in scans for c in s.captures)
    nat = frozenset(p for p, o in origins.items() if any(not x.is_tproxy for x in o))
    tproxy = frozenset(p for p, o in origins.items() if any(x.is_tproxy for x in o))
    return CapturePorts(
        ports=nat,
        origins=origins,
        sources_read=sources_read,
        sources_failed=dict(sources_failed or {}),
        sources_missing=sources_missing,
        tproxy_ports=tproxy,
        drops_invalid=any(s.drops_invalid for s in scans),
    )
