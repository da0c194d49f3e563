"""One scan of one network namespace: dump -> candidates -> conntrack -> owners -> findings.

Order matters for cost: the kernel filters by state (FIN_WAIT2 + CLOSE_WAIT), the
parser drops non-candidate sockets before building objects, and conntrack and
/proc are consulted only for what is left.  Nothing here changes the system.

``sockets_examined`` is the number of sockets the kernel returned for the
state-filtered dump (FIN_WAIT2 and CLOSE_WAIT, IPv4 and IPv6), before our port
filter: the work the scan could not avoid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from halfclose.agent.core.classify import Evidence, candidates, classify_paired
from halfclose.agent.core.model import (
    CaptureEvidence,
    ConntrackEntry,
    Endpoint,
    Finding,
    HalfClosedTimeouts,
    Owner,
    SocketRecord,
    TcpState,
    UnprovenReason,
)
from halfclose.agent.engine.nogc import gc_paused
from halfclose.agent.kernel import procfs, sysctl
from halfclose.agent.kernel.conntrack import Conntrack
from halfclose.agent.kernel.natrules.capture import CapturePorts
from halfclose.agent.kernel.natrules.generation import RulesGeneration
from halfclose.agent.kernel.natrules.sources import detect
from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.agent.kernel.sockdiag import SockDiag
from halfclose.agent.kernel.tcpmib import TcpCounters
from halfclose.errors import UserError

DUMP_STATES = (TcpState.FIN_WAIT2, TcpState.CLOSE_WAIT)
_FIN_WAIT2 = int(TcpState.FIN_WAIT2)  # a plain int: compared once per dumped socket


@dataclass(frozen=True, slots=True)
class ScanSettings:
    """What to scan for.

    ``capture_ports=None`` means judge the ports the netns's rules (or its
    DST_NAT conntrack entries) show captured; given ports only narrow what is
    judged, they never stand in for that evidence (docs/detection.md part 2).
    """

    capture_ports: frozenset[int] | None = None
    min_idle_seconds: float = 0.0
    proc_root: str = "/proc"
    # Detected ports are re-read when older than this (0: every scan).  NAT
    # rules are written once at pod start, so a long-running agent can cache.
    rules_max_age_seconds: float = 0.0
    # > 0: check each scan whether the rule set changed (natrules.generation:
    # nftables' generation id, no iptables-legacy table) and re-read at once
    # when it did; while it provably did not, keep the rules up to this age
    # instead.  Where it cannot be told (legacy tables), rules_max_age_seconds
    # applies.  0: no check.
    rules_unchanged_max_age_seconds: float = 0.0
    # The netns's half-closed conntrack timeouts (part 4) are re-read when
    # older than this.  Short: a raised timeout must raise the bar soon.
    timeouts_max_age_seconds: float = 5.0
    # > 0: a netns whose last dump found no FIN_WAIT2 or CLOSE_WAIT socket at
    # all, while its TCP counters stood still from QUIET_SETTLE_SECONDS before
    # it until now, is not dumped (such a dump can only be empty:
    # kernel/tcpmib.py), for up to this many seconds after that dump.  0:
    # every scan dumps.
    quiet_skip_max_seconds: float = 0.0
    # Look up each finding's owning process in /proc during the scan.  A walk
    # reads one link per fd of the holders (40,000 at 20k leaks, the scan's
    # largest stage), so a caller that reports only some findings (the agent)
    # turns this off and calls ``attach_owners`` for those it reports, for all
    # its netns in one pass.  Without owners, pairing groups by socket uid.
    owners: bool = True


@dataclass(frozen=True, slots=True)
class ScanResult:
    netns: str
    capture_ports: tuple[int, ...]
    sockets_examined: int
    duration_seconds: float
    findings: list[Finding] = field(default_factory=list)
    # Where each detected port came from; None when the rules were not read.
    port_origins: CapturePorts | None = None
    # Why findings may be incomplete (e.g. leaks withheld for lack of proof).
    warnings: tuple[str, ...] = ()
    # Part 4's bar in this netns at scan time (None: unknown).
    timeouts: HalfClosedTimeouts | None = None
    # Seconds spent per stage (rules, dump+decode, conntrack, owners,
    # classify, pairing, ...): the profile docs/performance.md tabulates.
    stages: dict[str, float] = field(default_factory=dict, compare=False)


class Laps:
    """Stage timer: ``lap(name)`` adds the time since the previous lap to ``name``."""

    __slots__ = ("_at", "stages")

    def __init__(self, started: float) -> None:
        self._at = started
        self.stages: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = self.stages.get(name, 0.0) + now - self._at
        self._at = now


@dataclass(frozen=True, slots=True)
class _Rules:
    """The netns's rules as read (or why not), for part 2."""

    found: CapturePorts | None
    error: str | None = None

    @property
    def incomplete(self) -> bool:
        return self.found is None or bool(self.found.unreadable)


# A segment counted this long before a dump has been processed by then.
QUIET_SETTLE_SECONDS = 1.0


@dataclass(slots=True)
class _Quiet:
    """The netns's TCP counters, since when they read so, and when a dump
    proved it had no half-closed socket under them (None: not proven)."""

    counters: bytes
    since: float
    proven_at: float | None = None


class Scanner:
    """Scans one netns; keeps its netlink sockets open across scans.

    The sockets are created inside the target netns once (docs/detection.md) and
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
        self._rules: _Rules | None = None
        self._rules_at = 0.0
        self._rules_token: tuple[int] | None = None
        self._generation = RulesGeneration(handle)
        self._tcp = TcpCounters(handle)
        self._quiet: _Quiet | None = None
        self.dumps_skipped = 0
        self._timeouts: HalfClosedTimeouts | UnprovenReason | None = None
        self._timeouts_at = 0.0
        self._timeout_files = TimeoutFiles(handle)
        self._nat_eps: frozenset[Endpoint] | None = None
        self._nat_eps_at = 0.0

    @property
    def sockdiag(self) -> SockDiag:
        return self._diag

    @property
    def conntrack(self) -> Conntrack:
        return self._ct

    def rules(self, settings: ScanSettings) -> _Rules:
        """The netns's NAT/TPROXY rules, cached (``ScanSettings.rules_*``)."""
        now = time.monotonic()
        token = None
        if settings.rules_unchanged_max_age_seconds > 0:
            # Before reading the rules: a change made meanwhile moves the
            # token past the one kept, and the next scan reads again.
            token = self._generation.read(settings.proc_root)
        age = now - self._rules_at
        if self._rules is None or token != self._rules_token:
            fresh = False  # changed, or the check came or went (a legacy table)
        elif token is not None:
            fresh = age < settings.rules_unchanged_max_age_seconds
        else:
            fresh = age < settings.rules_max_age_seconds
        if not fresh:
            try:
                self._rules = _Rules(detect(self.handle))
            except UserError as exc:
                self._rules = _Rules(None, str(exc))
            self._rules_at, self._rules_token = now, token
        assert self._rules is not None
        return self._rules

    def capture_ports(self, settings: ScanSettings) -> tuple[frozenset[int], CapturePorts | None]:
        """The ports judged: the given ones, else the rules' TCP capture ports."""
        rules = self.rules(settings)
        if settings.capture_ports is not None:
            return settings.capture_ports, rules.found
        if rules.found is None:
            raise UserError(rules.error or f"cannot read NAT rules in {self.handle.label}")
        return rules.found.ports, rules.found

    def timeouts(self, settings: ScanSettings) -> HalfClosedTimeouts | UnprovenReason:
        """This netns's half-closed conntrack timeouts (part 4), cached briefly."""
        now = time.monotonic()
        if self._timeouts is None or now - self._timeouts_at >= settings.timeouts_max_age_seconds:
            self._timeouts = self._timeout_files.read(settings.proc_root)
            self._timeouts_at = now
        return self._timeouts

    def scan(self, settings: ScanSettings | None = None) -> ScanResult:
        with gc_paused():
            return self._scan(settings or ScanSettings())

    def _scan(self, settings: ScanSettings) -> ScanResult:
        started = time.perf_counter()
        lap = Laps(started)
        rules = self.rules(settings)
        lap("rules")
        warnings: list[str] = []
        nat_eps: frozenset[Endpoint] | None = None
        if settings.capture_ports is not None:
            ports = settings.capture_ports
        elif rules.found is not None and not rules.incomplete:
            ports = rules.found.ports
        else:
            # Some rules are hidden from us (iptables-legacy without
            # CAP_NET_RAW, or no tool at all): the DST_NAT entries show the
            # captures those rules make, so their ports are judged too.
            nat_eps = self._nat_endpoints(settings.rules_max_age_seconds)
            if rules.found is None and not nat_eps:
                raise UserError(rules.error or f"cannot read NAT rules in {self.handle.label}")
            ports = (rules.found.ports if rules.found else frozenset()) | {e.port for e in nat_eps}
        capture = capture_evidence(rules.found, settings.capture_ports, nat_eps)
        tproxy_all = capture.tproxy_examined
        dump_ports = ports

        def keep(state: int, sport: int, _dport: int) -> bool:
            # FIN_WAIT2 on a judged port is a candidate (any FIN_WAIT2 where a
            # TPROXY socket may be one: its port is the original one); CLOSE_WAIT
            # off the judged ports may be its upstream leg.  Everything else is
            # dropped before an object is built.
            if state == _FIN_WAIT2:
                return tproxy_all or sport in dump_ports
            return sport not in dump_ports

        examined, sockets = self._dump(keep, settings)
        lap("dump+decode")
        findings, more = self._judge(sockets, ports, capture, nat_eps, settings, lap=lap)
        warnings.extend(more)
        if rules.found is None:
            warnings.insert(
                0,
                f"NAT rules could not be read ({rules.error}): captures are shown by "
                "conntrack's DST_NAT entries only",
            )
        else:
            # A rule source that exists but cannot be read (iptables-legacy
            # without CAP_NET_RAW) hides its capture ports: say so, every scan.
            warnings[:0] = [
                f"NAT rules from {src} could not be read ({why}): captures are "
                "also taken from conntrack's DST_NAT entries (grant the access to see all)"
                for src, why in rules.found.unreadable.items()
            ]
        timeouts = self._timeouts if isinstance(self._timeouts, HalfClosedTimeouts) else None
        return ScanResult(
            netns=self.handle.label,
            capture_ports=tuple(sorted(ports)),
            sockets_examined=examined,
            duration_seconds=time.perf_counter() - started,
            findings=findings,
            port_origins=rules.found,
            warnings=tuple(warnings),
            timeouts=timeouts,
            stages=lap.stages,
        )

    def _dump(
        self, keep: Callable[[int, int, int], bool], settings: ScanSettings
    ) -> tuple[int, list[SocketRecord]]:
        """The state-filtered dump, or (0, []) when it provably has nothing.

        Proof: a dump found no FIN_WAIT2/CLOSE_WAIT socket, and no TCP segment
        arrived in the netns from ``QUIET_SETTLE_SECONDS`` before that dump
        until now (the counters are the same).  A socket enters either state
        only on a received segment, counted on arrival; the settling time is
        for one counted before the counters were read but processed after the
        dump (a socket's backlog runs when its owner releases it).  Bounded
        by ``quiet_skip_max_seconds`` all the same.
        """
        if settings.quiet_skip_max_seconds <= 0:
            self._quiet = None
            return self._diag.dump(DUMP_STATES, keep)
        counters = self._tcp.read(settings.proc_root)
        now = time.monotonic()
        quiet = self._quiet
        if counters is None:
            quiet = self._quiet = None
        elif quiet is None or quiet.counters != counters:
            quiet = self._quiet = _Quiet(counters, since=now)
        elif (
            quiet.proven_at is not None and now - quiet.proven_at < settings.quiet_skip_max_seconds
        ):
            self.dumps_skipped += 1
            return 0, []
        examined, sockets = self._diag.dump(DUMP_STATES, keep)
        if quiet is not None:
            settled = now - quiet.since >= QUIET_SETTLE_SECONDS
            quiet.proven_at = now if examined == 0 and settled else None
        return examined, sockets

    def _nat_endpoints(
        self, max_age: float, wanted: Collection[SocketRecord] = ()
    ) -> frozenset[Endpoint]:
        """Local endpoints DST_NAT TCP entries show captured (part 2's rule-free evidence).

        A dump walks the kernel's whole conntrack hash (global, every netns:
        ~18 ms here for 262,144 buckets, filtered or not), so the answer is kept
        like the rules are (``max_age``): a capture does not stop being one.
        Kept answers are used only if they show every ``wanted`` socket's
        capture; otherwise the table is read again (new evidence may be there).
        """
        now = time.monotonic()
        kept = self._nat_eps
        if (
            kept is not None
            and now - self._nat_eps_at < max_age
            and all(s.local_normalized in kept for s in wanted)
        ):
            return kept
        self._nat_eps = frozenset(
            Endpoint(e.reply.src, e.reply.sport).normalized() for e in self._ct.dst_nat_entries()
        )
        self._nat_eps_at = now
        return self._nat_eps

    def evidence(
        self,
        capture: CaptureEvidence,
        by_cookie: Mapping[int, ConntrackEntry | None],
        settings: ScanSettings,
    ) -> tuple[Evidence, tuple[str, ...]]:
        """Parts 2-4's evidence with this netns's timeouts (and a warning if unknown)."""
        timeouts = self.timeouts(settings)
        if isinstance(timeouts, HalfClosedTimeouts):
            return Evidence(capture, timeouts=timeouts, by_cookie=by_cookie), ()
        return Evidence(capture, timeouts_missing=timeouts, by_cookie=by_cookie), (
            f"the conntrack timeouts of {self.handle.label} could not be read "
            f"({timeouts}): no leak can be proven",
        )

    def _judge(
        self,
        sockets: list[SocketRecord],
        ports: frozenset[int],
        capture: CaptureEvidence,
        nat_eps: frozenset[Endpoint] | None,
        settings: ScanSettings,
        *,
        lap: Laps,
    ) -> tuple[list[Finding], tuple[str, ...]]:
        judged = candidates(sockets, ports, capture)
        lap("classify")
        if not judged:
            return [], ()
        # Part 2 once per candidate: a rule port is CaptureEvidence.proves'
        # first answer (taken without the call); usually every candidate is
        # on one, and then all are proven.
        rule_ports = capture.rule_ports
        unshown = [
            s for s in judged if s.local.port not in rule_ports and capture.proves(s) is None
        ]
        proven = judged
        if unshown:
            if nat_eps is None:
                # The rules do not show every candidate's capture: conntrack's
                # DST_NAT entries may (one filtered dump, only when needed).
                found = self._nat_endpoints(settings.rules_max_age_seconds, unshown)
                capture = dataclasses.replace(capture, nat_endpoints=found)
                lap("dst-nat")
            proven = [s for s in judged if capture.proves(s) is not None]
        # One GET per proven candidate, many per send(), keyed back by cookie.
        by_cookie = self._ct.lookup_sockets(proven)
        lap("conntrack")
        evidence, warnings = self.evidence(capture, by_cookie, settings)
        lap("timeouts")
        owners: dict[int, Owner] = {}
        if settings.owners:
            # Owners for the candidates and for the CLOSE_WAIT sockets they may pair with.
            owners = procfs.find_owners(
                [s.inode for s in sockets if not s.orphan],
                self.handle.inode,
                proc_root=settings.proc_root,
                uid_hint={s.uid for s in judged},
            )
            lap("owners")
        # classify then pair (each finding built once), laps "classify" and "pairing".
        findings = classify_paired(
            judged,
            ports,
            evidence,
            owners,
            settings.min_idle_seconds,
            pool=sockets,
            capture_ports=ports,
            lap=lap,
        )
        return findings, warnings

    def close(self) -> None:
        self._diag.close()
        self._ct.close()
        self._timeout_files.close()
        self._generation.close()
        self._tcp.close()

    def __enter__(self) -> Scanner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


CLOSE_WAIT_TIMEOUT = "net.netfilter.nf_conntrack_tcp_timeout_close_wait"
FIN_WAIT_TIMEOUT = "net.netfilter.nf_conntrack_tcp_timeout_fin_wait"


def read_timeouts(
    handle: NetnsHandle, proc_root: str = "/proc"
) -> HalfClosedTimeouts | UnprovenReason:
    """The netns's half-closed TCP conntrack timeouts, or why they are unknown."""
    try:
        return HalfClosedTimeouts(
            close_wait=sysctl.read_int(handle, CLOSE_WAIT_TIMEOUT, proc_root),
            fin_wait=sysctl.read_int(handle, FIN_WAIT_TIMEOUT, proc_root),
        )
    except sysctl.SysctlMissing:
        return UnprovenReason.CONNTRACK_INACTIVE  # nf_conntrack is not loaded
    except (OSError, ValueError):
        return UnprovenReason.TIMEOUTS_UNKNOWN


class TimeoutFiles:
    """``read_timeouts`` for one netns, from its two sysctl files kept open.

    Opening them means entering the netns (``sysctl.open_sysctl``): ~40 us for
    the pair, against ~3 us to re-read open ones, and the agent re-reads every
    scan of a netns with candidates (its interval is longer than the cache's
    5 s).  An fd opened inside the netns reads that netns's value, now, on
    every read (docs: kernel/sysctl.py).  What cannot be opened is tried again
    next time (nf_conntrack may be loaded later); a read that fails closes the
    files and answers as ``read_timeouts`` does.
    """

    __slots__ = ("_fds", "_handle", "_root")

    def __init__(self, handle: NetnsHandle) -> None:
        self._handle = handle
        self._fds: tuple[int, int] | None = None
        self._root = ""

    def read(self, proc_root: str = "/proc") -> HalfClosedTimeouts | UnprovenReason:
        if self._fds is None or self._root != proc_root:
            self.close()
            try:
                close_wait = sysctl.open_sysctl(self._handle, CLOSE_WAIT_TIMEOUT, proc_root)
                try:
                    fin_wait = sysctl.open_sysctl(self._handle, FIN_WAIT_TIMEOUT, proc_root)
                except BaseException:
                    os.close(close_wait)
                    raise
            except sysctl.SysctlMissing:
                return UnprovenReason.CONNTRACK_INACTIVE  # nf_conntrack is not loaded
            except (OSError, ValueError):
                return UnprovenReason.TIMEOUTS_UNKNOWN
            self._fds, self._root = (close_wait, fin_wait), proc_root
        try:
            return HalfClosedTimeouts(
                close_wait=int(sysctl.reread(self._fds[0])),
                fin_wait=int(sysctl.reread(self._fds[1])),
            )
        except (OSError, ValueError):
            self.close()
            return read_timeouts(self._handle, proc_root)

    def close(self) -> None:
        fds, self._fds = self._fds, None
        for fd in fds or ():
            with contextlib.suppress(OSError):
                os.close(fd)


def capture_evidence(
    rules: CapturePorts | None,
    given: frozenset[int] | None,
    nat_endpoints: frozenset[Endpoint] | None,
) -> CaptureEvidence:
    """Part 2's evidence from the rules (and DST_NAT entries, when read already)."""
    if rules is None:
        return CaptureEvidence(nat_endpoints=nat_endpoints or frozenset())
    # TPROXY sockets are judged wherever TPROXY is in use and INVALID packets
    # are dropped, unless the ports given leave the TPROXY ports out.
    tproxy = bool(rules.tproxy_ports) and rules.drops_invalid
    if given is not None:
        tproxy = tproxy and bool(given & rules.tproxy_ports)
    return CaptureEvidence(
        rule_ports=rules.ports,
        nat_endpoints=nat_endpoints or frozenset(),
        tproxy_ports=rules.tproxy_ports,
        drops_invalid=rules.drops_invalid,
        tproxy_examined=tproxy,
    )


def attach_owners(
    results: Sequence[ScanResult], proc_root: str = "/proc", limit: int | None = None
) -> list[ScanResult]:
    """``results`` with each finding's owner filled in, one pass over /proc for all.

    For scans run with ``ScanSettings(owners=False)``.  Socket inodes are
    unique on the host, so one search serves every netns.  ``limit`` fills
    only each result's first findings (the ones a bounded report shows).
    """
    wanted: list[int] = []
    for r in results:
        wanted.extend(f.socket.inode for f in r.findings[:limit] if f.owner is None)
    if not wanted:
        return list(results)
    owners = procfs.find_owners(wanted, proc_root=proc_root)
    out = []
    for r in results:
        head = r.findings[:limit] if limit is not None else r.findings
        filled = [
            f.with_owner(owners[f.socket.inode])
            if f.owner is None and f.socket.inode in owners
            else f
            for f in head
        ]
        out.append(dataclasses.replace(r, findings=filled + r.findings[len(head) :]))
    return out


def scan(handle: NetnsHandle, settings: ScanSettings | None = None) -> ScanResult:
    """One-shot convenience: open a Scanner, scan once, close it."""
    with Scanner(handle) as scanner:
        return scanner.scan(settings)
