"""One scan of one network namespace: dump -> candidates -> conntrack -> owners -> findings.

Order matters for cost: the kernel filters by state (FIN_WAIT2 + CLOSE_WAIT), the
parser drops non-candidate sockets before building objects, and conntrack and
/proc are consulted only for what is left.  Nothing here changes the system.

``sockets_examined`` is the number of sockets the kernel returned for the
state-filtered dump (FIN_WAIT2 and CLOSE_WAIT, IPv4 and IPv6), before our port
filter: the work the scan could not avoid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from halfclose.agent.core.classify import classify, is_candidate
from halfclose.agent.core.model import Finding, SocketRecord, TcpState
from halfclose.agent.core.pairing import pair
from halfclose.agent.kernel import natrules, procfs
from halfclose.agent.kernel.conntrack import Conntrack
from halfclose.agent.kernel.natrules import CapturePorts
from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.agent.kernel.sockdiag import SockDiag

DUMP_STATES = (TcpState.FIN_WAIT2, TcpState.CLOSE_WAIT)
_FIN_WAIT2 = int(TcpState.FIN_WAIT2)  # a plain int: compared once per dumped socket


@dataclass(frozen=True, slots=True)
class ScanSettings:
    """What to scan for.  ``capture_ports=None`` means detect them from the rules."""

    capture_ports: frozenset[int] | None = None
    min_idle_seconds: float = 0.0
    proc_root: str = "/proc"
    # Detected ports are re-read when older than this (0: every scan).  NAT
    # rules are written once at pod start, so a long-running agent can cache.
    rules_max_age_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class ScanResult:
    netns: str
    capture_ports: tuple[int, ...]
    sockets_examined: int
    duration_seconds: float
    findings: list[Finding] = field(default_factory=list)
    # Where each detected port came from; None when the ports were given.
    port_origins: CapturePorts | None = None
    # Why findings may be incomplete (e.g. leaks withheld for lack of proof).
    warnings: tuple[str, ...] = ()


class Scanner:
    """Scans one netns; keeps its netlink sockets open across scans.

    The sockets are created inside the target netns once (design.md §3) and
    reused, so a periodic agent pays for namespace entry only at start.
    """

    def __init__(self, handle: NetnsHandle) -> None:
        self.handle = handle
        self._diag = SockDiag.open(handle)
        try:
            self._ct = Conntrack.open(handle)
        except BaseException:
            self._diag.close()
            raise
        self._rules: CapturePorts | None = None
        self._rules_at = 0.0

    @property
    def sockdiag(self) -> SockDiag:
        return self._diag

    @property
    def conntrack(self) -> Conntrack:
        return self._ct

    def capture_ports(self, settings: ScanSettings) -> tuple[frozenset[int], CapturePorts | None]:
        if settings.capture_ports is not None:
            return settings.capture_ports, None
        now = time.monotonic()
        if self._rules is None or now - self._rules_at >= settings.rules_max_age_seconds:
            self._rules = natrules.detect(self.handle)
            self._rules_at = now
        return self._rules.ports, self._rules

    def scan(self, settings: ScanSettings | None = None) -> ScanResult:
        settings = settings or ScanSettings()
        started = time.perf_counter()
        ports, origins = self.capture_ports(settings)

        def keep(state: int, sport: int, _dport: int) -> bool:
            # FIN_WAIT2 on a capture port is a candidate; CLOSE_WAIT off the
            # capture ports may be its upstream leg.  Everything else is dropped
            # before an object is built.
            if state == _FIN_WAIT2:
                return sport in ports
            return sport not in ports

        examined, sockets = self._diag.dump(DUMP_STATES, keep)
        findings, warnings = self._judge(sockets, ports, settings)
        if origins is not None:
            # A rule source that exists but cannot be read (iptables-legacy
            # without CAP_NET_RAW) hides its capture ports: say so, every scan.
            warnings = (
                tuple(
                    f"NAT rules from {src} could not be read ({why}): capture ports "
                    "may be incomplete (grant the access, or give the ports)"
                    for src, why in origins.unreadable.items()
                )
                + warnings
            )
        return ScanResult(
            netns=self.handle.label,
            capture_ports=tuple(sorted(ports)),
            sockets_examined=examined,
            duration_seconds=time.perf_counter() - started,
            findings=findings,
            port_origins=origins,
            warnings=warnings,
        )

    def _judge(
        self, sockets: list[SocketRecord], ports: frozenset[int], settings: ScanSettings
    ) -> tuple[list[Finding], tuple[str, ...]]:
        candidates = [s for s in sockets if is_candidate(s, ports)]
        if not candidates:
            return [], ()
        lookups = self._ct.lookup_replies([s.nat_reply_tuple for s in candidates])
        warnings: tuple[str, ...] = ()
        # A missing entry proves a leak only where conntrack tracks the
        # connection.  Detected REDIRECT/TPROXY rules guarantee it; ports given
        # by hand do not (conntrack is inactive in a netns until a rule needs
        # it), and there an empty table would make every candidate look leaked.
        # Withhold the leaks: classify() skips a candidate with no lookup result.
        if (
            settings.capture_ports is not None
            and None in lookups.values()
            and self._ct.count() == 0
        ):
            lookups = {t: e for t, e in lookups.items() if e is not None}
            warnings = (
                "conntrack tracks no connection in this netns, so a missing NAT entry "
                "proves nothing: leaks were not reported (let the capture ports be "
                "detected from the NAT rules, or check the ports given)",
            )
        # Owners for the candidates and for the CLOSE_WAIT sockets they may pair with.
        wanted = [s for s in sockets if not s.orphan]
        owners = procfs.find_owners(
            [s.inode for s in wanted],
            self.handle.inode,
            proc_root=settings.proc_root,
            uid_hint={s.uid for s in candidates},
        )
        findings = classify(candidates, ports, lookups, owners, settings.min_idle_seconds)
        return pair(findings, sockets, ports, owners), warnings

    def close(self) -> None:
        self._diag.close()
        self._ct.close()

    def __enter__(self) -> Scanner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scan(handle: NetnsHandle, settings: ScanSettings | None = None) -> ScanResult:
    """One-shot convenience: open a Scanner, scan once, close it."""
    with Scanner(handle) as scanner:
        return scanner.scan(settings)
