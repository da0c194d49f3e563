"""The agent loop: matched pods -> network namespaces -> scan -> plan -> act -> report.

Concurrency model (threads, not asyncio): the work is blocking syscalls
(netlink, setns, /proc), which asyncio would have to push to threads anyway.
One *loop thread* owns every netns, scanner and conntrack-event socket — no
locks around kernel state — and waits in ``select()`` on the event sockets
plus a wake-up pipe, with a timeout set by the next scheduled scan.  The
Kubernetes watches, the report writer and the HTTP server each run on their
own thread and talk to the loop only through ``notify()`` and the writer's
queue.

When a netns is scanned:
- on its policy's ``scanIntervalSeconds``;
- ~150 ms after a conntrack DESTROY event for a proxied entry (a leak may
  have just formed; the delay batches a burst);
- right after an at-risk entry's timer runs out (the scan saw its timeout), or
  a too-young leak becomes old enough: the leak is handled within a scan's time
  of forming even when the kernel's conntrack GC reaps the entry (and sends
  the event) late;
- at once on a conntrack NEW event whose reply tuple is a stale socket's the
  last scan found (leaked, or unproven): the app is reusing that socket's port
  and hangs until it goes (a collision, istio#43301).  The netns's event
  socket joins the NEW group only while such sockets exist, so a busy pod
  without leaks pays nothing, and one with leaks one set lookup per event.

A pod whose netns resolves to the host's is refused (``hostnetns``): the agent
never judges the node's own sockets.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import os
import select
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from halfclose.agent.core.model import Finding, FlowTuple, Kind, Outcome, UnprovenReason
from halfclose.agent.core.plan import (
    DEFAULT_MAX_KILLS,
    ActionKind,
    ActionSettings,
    FindingOutcome,
    Plan,
    make_plan,
)
from halfclose.agent.core.ratelimit import TokenBucket
from halfclose.agent.daemon.hostnetns import host_netns_inodes
from halfclose.agent.daemon.metrics import AgentMetrics
from halfclose.agent.daemon.settings import AgentSettings
from halfclose.agent.daemon.targets import PodKey, PodTarget, parse_policies, pod_targets
from halfclose.agent.engine.scan import Scanner, ScanResult, ScanSettings
from halfclose.agent.kernel.ctevents import (
    ConntrackEventSocket,
    collision_forming,
    leak_countdown,
    leak_forming,
)
from halfclose.agent.kernel.netlink import NETLINK_NETFILTER, open_socket
from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.agent.kernel.podnetns import PodNetnsResolver, PodNetnsSource
from halfclose.agent.kube.reports import PodEvent, PodRef, ReportUpdate
from halfclose.api.policy import KILL_SOCKETS, PATCH_CONNTRACK, Policy
from halfclose.api.report import (
    FindingUpstream,
    ReportError,
    ReportFinding,
    ReportStatus,
    ScanSummary,
    build_report_status,
    parse_report,
    report_manifest,
    report_status_json,
)
from halfclose.errors import UserError

log = logging.getLogger(__name__)

# A netns whose scan keeps failing is retried on this schedule, not hammered.
ERROR_RETRY_SECONDS = 5.0
# Pods whose containers have not resolved to a netns yet are retried this often.
RECONCILE_SECONDS = 5.0
# Scans are never closer together than this for one netns (predicted expiries
# are in whole seconds, so a scan "at" expiry may come a little early).
MIN_SCAN_SPACING = 0.1
# How long after a predicted NAT entry expiry the scan runs.
EXPIRY_MARGIN = 0.05
# Reports are rewritten when their content changes, and at least this often
# so lastScanTime shows the agent is alive.
REPORT_REFRESH_SECONDS = 300.0
# The per-scan cap under the node-wide bucket (the plan's own default).
MAX_KILLS_PER_SCAN = DEFAULT_MAX_KILLS
# Per-collision Events per scan; more are summed up in one.
MAX_COLLISION_EVENTS = 5
# The FIN_WAIT2 findings whose reply tuple a NEW entry may collide with.  Not
# at-risk ones: their entry still holds the tuple (no new entry can take it),
# and when it expires the scan scheduled for that moment finds the leak (or the
# collision) anyway.  Leaving them out keeps NEW events off in the common case
# of a busy pod under KillSockets: at-risk sockets always, leaks seldom.
STALE_KINDS = frozenset({Kind.LEAKED, Kind.COLLISION})
# Remembered conntrack destroy/expiry times per netns, for leak lifetimes.
# Bounded per netns; records older than a proxy's idle timeout are useless.
MAX_EXPIRY_RECORDS = 2048
EXPIRY_RECORD_MAX_AGE = 3700.0


class WorldSource(Protocol):
    """What the Kubernetes watches provide (``agent.kube.world`` or the fake)."""

    def policies(self) -> list[Mapping[str, Any]]: ...
    def pods(self) -> list[Mapping[str, Any]]: ...
    def namespace_labels(self) -> dict[str, Mapping[str, str]]: ...
    def synced(self) -> bool: ...
    def previous_report(self, namespace: str, name: str) -> Mapping[str, Any] | None: ...


class ReportSink(Protocol):
    def submit(self, update: ReportUpdate) -> None: ...
    def event(self, event: PodEvent) -> None: ...


class Remediator(Protocol):
    """The remediation engine as the loop uses it (``agent.daemon.remediate``)."""

    def execute(self, scanner: Scanner, plan: Plan) -> list[FindingOutcome]: ...
    def patch_sysctl(self, handle: NetnsHandle, timeout: int) -> bool: ...
    def restore_sysctl(self, handle: NetnsHandle) -> bool: ...
    def restore_inode(self, inode: int) -> bool: ...
    def patched_inodes(self) -> set[int]: ...


@dataclass(slots=True)
class PodState:
    """What the agent remembers about a pod between scans."""

    target: PodTarget
    status: ReportStatus | None = None
    reported: tuple[object, ...] | None = None
    reported_at: float = float("-inf")


@dataclass(slots=True)
class WatchedNetns:
    inode: int
    handle: NetnsHandle
    scanner: Scanner
    events: ConntrackEventSocket | None
    pods: list[PodKey]
    next_scan: float
    trigger_at: float | None = None
    capture_ports: frozenset[int] | None = None
    sysctl_patched: bool = False  # its close_wait sysctl is raised (and recorded)
    # reply tuple -> wall time the entry expired (predicted or DESTROY event)
    expired_at: OrderedDict[FlowTuple, float] = field(default_factory=OrderedDict)
    # socket cookie -> wall time a scan first saw it leaked
    leaked_since: dict[int, float] = field(default_factory=dict)
    # The scan warnings last seen, so each new one is logged and counted once.
    warnings: tuple[str, ...] = ()
    # NAT reply tuples of the stale (leaked, collision, unproven) FIN_WAIT2 sockets
    # of the last scan: a NEW entry under one of them is a collision (istio#43301).
    stale_replies: frozenset[FlowTuple] = frozenset()
    # Cookies of the sockets already counted (and announced) as collisions.
    collisions_seen: set[int] = field(default_factory=set)

    def remember_stale(self, findings: list[Finding]) -> None:
        """Keep the stale sockets' reply tuples; watch NEW events only while there are some."""
        self.stale_replies = frozenset(
            f.socket.nat_reply_tuple
            for f in findings
            if f.kind in STALE_KINDS
            # Unproven for want of evidence, not of NAT: a reuse of its port is
            # judged afresh by the scan it triggers.
            or (f.kind is Kind.UNPROVEN and f.reason is not UnprovenReason.NOT_NAT_CAPTURED)
        )
        if self.events is not None:
            try:
                self.events.watch_new(bool(self.stale_replies))
            except OSError as exc:  # the poll interval still finds collisions, later
                log.warning("netns %d: cannot watch conntrack NEW events: %s", self.inode, exc)

    def close(self) -> None:
        for closer in (
            self.scanner.close,
            self.events.close if self.events else None,
            self.handle.close,
        ):
            if closer is None:
                continue
            with contextlib.suppress(OSError):
                closer()

    def note_expiry(self, reply: FlowTuple, at: float, predicted: bool = False) -> None:
        """Remember when an entry expired (a DESTROY) or will expire (a prediction).

        A newer prediction replaces an older one (packets re-arm the timer);
        a DESTROY, reaped late by the GC, only ever moves the time earlier.
        """
        known = self.expired_at.get(reply)
        if predicted or known is None or at < known:
            self.expired_at[reply] = at
            self.expired_at.move_to_end(reply)
        while len(self.expired_at) > MAX_EXPIRY_RECORDS:
            self.expired_at.popitem(last=False)

    def prune_expiries(self, now: float) -> None:
        # Insertion order is (nearly) time order: drop from the old end.
        while self.expired_at:
            reply, at = next(iter(self.expired_at.items()))
            if at >= now - EXPIRY_RECORD_MAX_AGE:
                break
            del self.expired_at[reply]


def new_warnings(previous: tuple[str, ...], current: tuple[str, ...]) -> list[str]:
    """The warnings of this scan that the last scan of the netns did not have.

    A warning that persists is reported once; one that went away and comes
    back is new again (someone fixed the access, then it broke again).
    """
    return [w for w in current if w not in previous]


def error_reason(exc: BaseException) -> str:
    """The ``reason`` label of ``halfclose_scan_errors_total`` for a failure."""
    if isinstance(exc, UserError):
        # netns.py raises "from None", but the OSError stays the context: a
        # netns that cannot be *entered* (no CAP_SYS_ADMIN) is not gone.
        cause = exc.__context__
        if isinstance(cause, OSError) and cause.errno in (errno.EPERM, errno.EACCES):
            return "permission"
        return "netns_gone"
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOENT, errno.ESRCH, errno.EBADF, errno.EINVAL):
            return "netns_gone"
        if exc.errno in (errno.EPERM, errno.EACCES):
            return "permission"
        if exc.errno in (errno.ENOBUFS, errno.EBUSY, errno.EAGAIN):
            return "netlink"
        return "netlink" if exc.errno else "os"
    return "internal"


def action_settings(policy: Policy, max_kills: int) -> ActionSettings:
    spec = policy.spec
    if spec.action == KILL_SOCKETS:
        kind = ActionKind.KILL
    elif spec.action == PATCH_CONNTRACK:
        kind = (
            ActionKind.PATCH_CONNTRACK
            if spec.conntrack.strategy == "Sysctl"
            else ActionKind.EXTEND_CONNTRACK
        )
    else:
        kind = ActionKind.REPORT
    return ActionSettings(
        action=kind,
        min_idle_seconds=float(spec.thresholds.min_idle_seconds),
        max_kills=max_kills,
        dry_run=spec.dry_run,
        close_wait_timeout=spec.conntrack.close_wait_timeout_seconds,
    )


def wants_sysctl(policy: Policy) -> bool:
    spec = policy.spec
    return spec.action == PATCH_CONNTRACK and spec.conntrack.strategy == "Sysctl"


def collision_text(finding: Finding) -> str:
    """``127.0.0.1:15001<-192.0.2.10:51920 blocking a new connection from 192.0.2.10:51920
    to 203.0.113.10:7777`` (the destination when the new entry names it)."""
    s = finding.socket
    text = f"{s.local}<-{s.peer} blocking a new connection from {s.peer}"
    entry = finding.entry
    if entry is not None:
        o = entry.original
        dst = f"[{o.dst}]:{o.dport}" if o.dst.version == 6 else f"{o.dst}:{o.dport}"
        text += f" to {dst}"
    return text


def report_finding(finding: Finding, outcome: FindingOutcome | None, at: str) -> ReportFinding:
    up = finding.upstream
    action = "none"
    error = None
    if outcome is not None:
        action = outcome.outcome.value if outcome.outcome is not Outcome.SKIPPED else "none"
        error = outcome.error
    idle = finding.socket.idle_seconds
    return ReportFinding(
        kind=finding.kind.value,  # the same values: test_collision_glue
        reason=finding.reason.value if finding.reason is not None else None,
        state=finding.socket.state.ss_name,
        local=str(finding.socket.local),
        peer=str(finding.socket.peer),
        idle_seconds=int(idle) if idle is not None else None,
        pid=finding.owner.pid if finding.owner else None,
        process=finding.owner.process[:64] if finding.owner else None,
        upstream=(
            FindingUpstream(local=str(up.local), peer=str(up.peer), state=up.state.ss_name)
            if up is not None
            else None
        ),
        action=action,  # type: ignore[arg-type]
        error=error,
        observed_time=at,
    )


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        metrics: AgentMetrics,
        world: WorldSource,
        reports: ReportSink,
        remediator: Remediator,
        *,
        resolver: PodNetnsSource | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.world = world
        self.reports = reports
        self.remediator = remediator
        self.resolver = resolver or PodNetnsResolver(settings.host_proc)
        self.clock = clock
        self.wall = wall
        self.netns: dict[int, WatchedNetns] = {}
        self.pods: dict[PodKey, PodState] = {}
        self.bucket: TokenBucket | None = None
        self.last_pass = clock()
        self.scans = 0
        # Raw leak lifetimes for the benchmark (the histogram has buckets only).
        self.lifetimes: deque[float] = deque(maxlen=100_000)
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._changed.set()
        self._wake_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._next_reconcile = 0.0
        self.host_netns = host_netns_inodes(settings.host_proc)
        self._refused: set[PodKey] = set()  # pods refused for the host netns (logged once)

    # -- called from other threads --------------------------------------------------

    def notify(self) -> None:
        """The watched world changed: reconcile at the next pass."""
        self._changed.set()
        self._poke()

    def stop(self) -> None:
        self._stop.set()
        self._poke()

    def _poke(self) -> None:
        # Under the lock: after shutdown the fd number may belong to a new file.
        with self._wake_lock:
            if self._wake_w < 0:
                return
            with contextlib.suppress(BlockingIOError):  # a wake-up is pending already
                os.write(self._wake_w, b"x")

    def healthy(self, max_stall: float = 60.0) -> bool:
        return self.clock() - self.last_pass < max_stall

    # -- the loop -------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                self.run_once()
        finally:
            self.shutdown()

    def run_once(self, max_wait: float = 1.0) -> None:
        """One pass: reconcile if needed, run due scans, then wait for the next thing."""
        now = self.clock()
        self.last_pass = now
        if self._changed.is_set() or now >= self._next_reconcile:
            self._changed.clear()
            self._next_reconcile = now + RECONCILE_SECONDS
            try:
                self.reconcile()
            except Exception:
                log.exception("reconcile failed")
                self.metrics.scan_errors.labels(reason="internal").inc()
        for watched in list(self.netns.values()):
            now = self.clock()
            due = watched.next_scan <= now or (
                watched.trigger_at is not None and watched.trigger_at <= now
            )
            if due and not self._stop.is_set():
                self.scan_netns(watched)
        self._wait(max_wait)

    def _wait(self, max_wait: float) -> None:
        now = self.clock()
        deadline = now + max_wait
        for watched in self.netns.values():
            deadline = min(deadline, watched.next_scan)
            if watched.trigger_at is not None:
                deadline = min(deadline, watched.trigger_at)
        timeout = max(0.0, deadline - now)
        by_fd = {w.events.fileno(): w for w in self.netns.values() if w.events is not None}
        # poll(), not select(): a node with a few hundred pods has fds past 1024.
        poller = select.poll()
        for fd in (self._wake_r, *by_fd):
            poller.register(fd, select.POLLIN)
        try:
            ready = poller.poll(timeout * 1000.0)
        except OSError:
            return  # interrupted: just go round again
        for fd, _mask in ready:
            if fd == self._wake_r:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            self._on_events(by_fd[fd])

    def _on_events(self, watched: WatchedNetns) -> None:
        assert watched.events is not None
        try:
            events, overflowed = watched.events.drain()
        except OSError as exc:
            log.warning("conntrack events of netns %d: %s", watched.inode, exc)
            self.metrics.scan_errors.labels(reason="netlink").inc()
            return
        wall, now = self.wall(), self.clock()
        relevant = False
        for event in events:
            if event.created:
                if collision_forming(event, watched.stale_replies):
                    # The app reuses a stale socket's port and hangs until it
                    # goes: scan now (the kill, under KillSockets, comes first).
                    log.info(
                        "netns %d: new connection under stale reply tuple %s: scanning",
                        watched.inode,
                        event.reply,
                    )
                    watched.trigger_at = now
                continue
            if leak_forming(event, watched.capture_ports):
                watched.note_expiry(event.reply, wall)
                relevant = True
                continue
            countdown = leak_countdown(event, watched.capture_ports)
            if countdown is not None:
                # The proxy just half-closed this connection: the leak can form
                # when the entry's timer runs out.  Scan just after that.
                watched.note_expiry(event.reply, wall + countdown, predicted=True)
                at = now + countdown + EXPIRY_MARGIN
                watched.next_scan = min(watched.next_scan, at)
        if (relevant or overflowed) and watched.trigger_at is None:
            watched.trigger_at = now + self.settings.event_debounce_seconds

    # -- reconcile: which netns, which pods, which policy ------------------------------

    def reconcile(self) -> None:
        policies = parse_policies(self.world.policies())
        targets = pod_targets(
            policies, self.world.pods(), self.world.namespace_labels(), self.settings.node_name
        )
        self._update_bucket(policies)
        # Group pods by netns inode (pods sharing one are scanned once).
        wanted: dict[int, tuple[str, list[PodKey]]] = {}
        refused: set[PodKey] = set()
        for key, target in sorted(targets.items()):
            where = self.resolver.resolve(target.container_ids, target.pod_ips, target.host_ips)
            if where is None:
                continue
            if where.inode in self.host_netns:
                refused.add(key)
                continue
            wanted.setdefault(where.inode, (where.path, []))[1].append(key)
        # Pods that left: forget their series and reports.
        for key in [k for k in self.pods if k not in targets]:
            self._drop_pod(key, pod_gone=not self._pod_exists(key))
        for key, target in targets.items():
            if key in self.pods:
                self.pods[key].target = target
            else:
                self.pods[key] = PodState(target, status=self._previous_status(target))
                # At 0 from the start: the collision alert takes increase() of it,
                # and a series born at 1 shows no increase for the first collision.
                self.metrics.collisions.labels(*key)
        for key in sorted(refused - self._refused):
            self._refuse_host_netns(self.pods[key])
        self._refused = refused
        # Netns nobody wants any more: put the sysctl back, then let go.
        for inode in [i for i in self.netns if i not in wanted]:
            leaving = self.netns.pop(inode)
            if leaving.sysctl_patched:
                self._restore_sysctl(leaving)
            self._close_netns(leaving)
        now = self.clock()
        for inode, (path, keys) in wanted.items():
            watched = self.netns.get(inode)
            if watched is None:
                watched = self._open_netns(inode, path, keys, now)
                if watched is None:
                    continue
                self.netns[inode] = watched
            else:
                watched.pods = keys
                watched.next_scan = min(watched.next_scan, now + self._interval(watched))
            owner = self.pods[keys[0]].target.policy
            if watched.sysctl_patched and not wants_sysctl(owner):
                self._restore_sysctl(watched)  # the policy changed action or strategy
        self.metrics.watched_netns.set(len(self.netns))
        self._restore_orphan_sysctls()

    def _refuse_host_netns(self, state: PodState) -> None:
        """Never scan the node's own netns for a pod (once per pod, until it changes)."""
        t = state.target
        log.warning(
            "refusing pod %s/%s: its containers resolve to the host network namespace; "
            "the agent never scans or acts on the node's own sockets",
            t.namespace,
            t.name,
        )
        self.metrics.scan_errors.labels(reason="host_netns").inc()
        self._event(
            state,
            "HostNetnsRefused",
            "Not scanned: the pod's containers are in the host network namespace",
            "Warning",
        )

    def _previous_status(self, target: PodTarget) -> ReportStatus | None:
        """The status this node's agent wrote before a restart, so totals carry on."""
        obj = self.world.previous_report(target.namespace, target.name)
        if obj is None:
            return None
        try:
            report = parse_report(obj)
        except ReportError as exc:
            log.warning("ignoring unreadable report: %s", exc)
            return None
        return report.status if report.spec.pod_uid == target.uid else None

    def _pod_exists(self, key: PodKey) -> bool:
        return any(
            (p.get("metadata") or {}).get("namespace") == key[0]
            and (p.get("metadata") or {}).get("name") == key[1]
            for p in self.world.pods()
        )

    def _update_bucket(self, policies: list[Policy]) -> None:
        # One node-wide budget: the tightest maxKillsPerMinute of the policies
        # that kill (the field is "per node"; with several, the strictest wins).
        limits = [
            p.spec.thresholds.max_kills_per_minute
            for p in policies
            if p.spec.action == KILL_SOCKETS
        ]
        per_minute = min(limits) if limits else 0
        now = self.clock()
        if self.bucket is None:
            self.bucket = TokenBucket(per_minute=per_minute, now=now)
        elif self.bucket.per_minute != per_minute:
            self.bucket.resize(per_minute, now)

    def _open_netns(
        self, inode: int, path: str, keys: list[PodKey], now: float
    ) -> WatchedNetns | None:
        handle: NetnsHandle | None = None
        try:
            handle = NetnsHandle.from_path(path)
            if handle.inode != inode:
                raise UserError(f"{path} changed netns while opening")  # pid reused
            scanner = Scanner(handle)
        except (UserError, OSError) as exc:
            if handle is not None:
                handle.close()
            log.warning("cannot watch netns %s of %s: %s", path, keys, exc)
            self.metrics.scan_errors.labels(reason=error_reason(exc)).inc()
            self.resolver.invalidate()
            return None
        events: ConntrackEventSocket | None = None
        try:
            events = ConntrackEventSocket(open_socket(NETLINK_NETFILTER, handle))
        except OSError as exc:
            # Without events the poll interval still finds every leak, later.
            log.warning("no conntrack events for netns %s: %s", path, exc)
        log.info("watching netns %d (%s) for %s", inode, path, ", ".join("/".join(k) for k in keys))
        # First scan now: a freshly matched pod may have leaks already.
        return WatchedNetns(inode, handle, scanner, events, keys, next_scan=now)

    def _note_warnings(self, watched: WatchedNetns, warnings: tuple[str, ...]) -> None:
        """Log and count each new scan warning once per netns, not once per scan.

        A warning means the scan ran but may miss leaks (unreadable NAT rules,
        no conntrack to prove a leak with): scan_errors{reason="incomplete"}
        feeds the scan-errors alert, so someone fixes the access or the ports.
        """
        for warning in new_warnings(watched.warnings, warnings):
            log.warning("netns %d (%s): %s", watched.inode, "/".join(watched.pods[0]), warning)
            self.metrics.scan_errors.labels(reason="incomplete").inc()
        watched.warnings = warnings

    def _close_netns(self, watched: WatchedNetns) -> None:
        log.info("no longer watching netns %d", watched.inode)
        watched.close()

    def _netns_of(self, key: PodKey) -> WatchedNetns | None:
        return next((w for w in self.netns.values() if key in w.pods), None)

    def _drop_pod(self, key: PodKey, pod_gone: bool) -> None:
        state = self.pods.pop(key)
        self.metrics.forget_pod(*key)
        if state.status is not None and not pod_gone:
            # The pod still exists but no policy applies any more: its report goes.
            # (A deleted pod's report is garbage-collected through its owner.)
            self.reports.submit(ReportUpdate(PodRef(key[0], key[1], state.target.uid), None, None))

    def _restore_sysctl(self, watched: WatchedNetns) -> None:
        try:
            self.remediator.restore_sysctl(watched.handle)
            watched.sysctl_patched = False
            log.info("restored the close_wait sysctl of netns %d", watched.inode)
        except (OSError, UserError) as exc:
            log.warning("restoring the close_wait sysctl of netns %d: %s", watched.inode, exc)
            self.metrics.scan_errors.labels(reason=error_reason(exc)).inc()
        self.metrics.patched_pods.set(len(self.remediator.patched_inodes()))

    def _restore_orphan_sysctls(self) -> None:
        """Patch records no watched netns accounts for: restore them.

        After a restart, a record whose netns is watched under a Sysctl policy
        is adopted; any other (the policy was deleted or changed while the
        agent was down, the pod stopped matching) is restored where its netns
        still exists, and dropped where it does not.  Never before the policies
        are known: restoring on ignorance would undo a wanted patch.
        """
        if not self.world.synced():
            return
        mine = set()
        for watched in self.netns.values():
            owner = self.pods.get(watched.pods[0]) if watched.pods else None
            if owner is not None and wants_sysctl(owner.target.policy):
                mine.add(watched.inode)
        for inode in self.remediator.patched_inodes() - mine:
            held = self.netns.get(inode)
            try:
                if held is not None:
                    self._restore_sysctl(held)
                else:
                    self.remediator.restore_inode(inode)
            except (OSError, UserError) as exc:
                log.warning("restoring the close_wait sysctl of netns %d: %s", inode, exc)
        for watched in self.netns.values():
            if watched.inode in mine and watched.inode in self.remediator.patched_inodes():
                watched.sysctl_patched = True  # adopted from an earlier run
        self.metrics.patched_pods.set(len(self.remediator.patched_inodes()))

    # -- one scan ---------------------------------------------------------------------

    def _interval(self, watched: WatchedNetns) -> float:
        states = [self.pods[k] for k in watched.pods if k in self.pods]
        if not states:
            return self.settings.default_scan_interval_seconds
        seconds: int = min(s.target.policy.spec.scan_interval_seconds for s in states)
        return float(seconds)

    def scan_netns(self, watched: WatchedNetns) -> None:
        started = self.clock()
        watched.trigger_at = None
        interval = self._interval(watched)
        watched.next_scan = started + interval
        if not watched.pods or watched.pods[0] not in self.pods:
            return
        # Pods sharing a netns share its sockets: the first pod (by name) owns
        # the findings, so they are reported and acted on once.
        state = self.pods[watched.pods[0]]
        policy = state.target.policy
        try:
            if wants_sysctl(policy) and not watched.sysctl_patched and not policy.spec.dry_run:
                timeout = policy.spec.conntrack.close_wait_timeout_seconds
                if self.remediator.patch_sysctl(watched.handle, timeout):
                    self._event(
                        state,
                        "ConntrackSysctlPatched",
                        f"Raised nf_conntrack_tcp_timeout_close_wait to {timeout}s in "
                        "the pod's network namespace",
                    )
                watched.sysctl_patched = True
                self.metrics.patched_pods.set(len(self.remediator.patched_inodes()))
            result = watched.scanner.scan(
                ScanSettings(
                    capture_ports=frozenset(policy.spec.capture_ports) or None,
                    min_idle_seconds=0.0,  # the plan applies the threshold; report all
                    proc_root=self.settings.host_proc,
                    rules_max_age_seconds=60.0,
                )
            )
            watched.capture_ports = frozenset(result.capture_ports)
            watched.remember_stale(result.findings)
            self._note_warnings(watched, result.warnings)
            outcomes = self._act(watched, state, policy, result)
        except Exception as exc:
            reason = error_reason(exc)
            self.metrics.scan_errors.labels(reason=reason).inc()
            log.warning(
                "scan of netns %d (%s) failed: %s: %s",
                watched.inode,
                "/".join(watched.pods[0]),
                reason,
                exc,
            )
            watched.next_scan = self.clock() + min(interval, ERROR_RETRY_SECONDS)
            if reason == "netns_gone":
                self.resolver.invalidate()
                self._changed.set()
            return
        self.scans += 1
        self.metrics.scan_duration.observe(result.duration_seconds)
        self._schedule_followup(watched, result, policy)
        self._record(watched, state, policy, result, outcomes)

    def _act(
        self, watched: WatchedNetns, state: PodState, policy: Policy, result: ScanResult
    ) -> dict[int, FindingOutcome]:
        ports = frozenset(result.capture_ports)
        unlimited = action_settings(policy, max_kills=MAX_KILLS_PER_SCAN)
        granted = 0
        settings = unlimited
        if unlimited.action is ActionKind.KILL and not unlimited.dry_run:
            # Ask the node-wide bucket for as many kills as this scan qualifies.
            eligible = len(make_plan(result.findings, ports, unlimited).kills)
            assert self.bucket is not None
            granted = self.bucket.take(eligible, self.clock())
            settings = action_settings(policy, max_kills=granted)
        plan = make_plan(result.findings, ports, settings)
        outcomes = self.remediator.execute(watched.scanner, plan) if result.findings else []
        if granted and self.bucket is not None:
            spent = sum(1 for o in outcomes if o.outcome is Outcome.KILLED)
            self.bucket.give_back(granted - spent)
        return {o.finding.socket.cookie: o for o in outcomes}

    def _schedule_followup(self, watched: WatchedNetns, result: ScanResult, policy: Policy) -> None:
        """Scan again when the next leak can form, or a young leak comes of age."""
        now_m, now_w = self.clock(), self.wall()
        min_idle = float(policy.spec.thresholds.min_idle_seconds)
        soonest: float | None = None
        for f in result.findings:
            if f.kind is Kind.AT_RISK and f.entry is not None and f.entry.tcp_state == "CLOSE_WAIT":
                # ctnetlink reports whole seconds left (rounded down): the entry
                # goes in [timeout, timeout + 1) s.  Scan just after the earliest.
                delay = f.entry.timeout + EXPIRY_MARGIN
                watched.note_expiry(
                    f.socket.nat_reply_tuple, now_w + f.entry.timeout, predicted=True
                )
            elif f.kind is Kind.LEAKED and policy.spec.action == KILL_SOCKETS:
                idle = f.socket.idle_seconds or 0.0
                if idle >= min_idle:
                    continue  # acted on (or rate-limited: the interval covers it)
                delay = min_idle - idle + 0.05
            else:
                continue
            soonest = delay if soonest is None else min(soonest, delay)
        if soonest is not None:
            watched.next_scan = min(watched.next_scan, now_m + max(MIN_SCAN_SPACING, soonest))

    def _record(
        self,
        watched: WatchedNetns,
        state: PodState,
        policy: Policy,
        result: ScanResult,
        outcomes: Mapping[int, FindingOutcome],
    ) -> None:
        ns, pod = state.target.namespace, state.target.name
        wall = self.wall()
        scanned_at = dt.datetime.fromtimestamp(wall, dt.UTC)
        stamp = scanned_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        leaked = [f for f in result.findings if f.kind in (Kind.LEAKED, Kind.COLLISION)]
        at_risk = [f for f in result.findings if f.kind is Kind.AT_RISK]
        self._record_unproven(ns, pod, result.findings)
        collisions = [f for f in result.findings if f.kind is Kind.COLLISION]
        fresh = [f for f in collisions if f.socket.cookie not in watched.collisions_seen]
        if fresh:
            self.metrics.collisions.labels(ns, pod).inc(len(fresh))
        watched.collisions_seen = {f.socket.cookie for f in collisions}
        # Leak lifetimes: from entry expiry (event or prediction), else first sighting.
        seen_now = {f.socket.cookie for f in leaked}
        for f in leaked:
            watched.leaked_since.setdefault(f.socket.cookie, wall)
        killed_ports: dict[int, int] = {}
        failures: dict[str, int] = {}
        killed = extended = 0
        unblocked: list[Finding] = []
        for f in result.findings:
            o = outcomes.get(f.socket.cookie)
            if o is None:
                continue
            if o.outcome is Outcome.KILLED:
                killed += 1
                if f.kind is Kind.COLLISION:
                    unblocked.append(f)
                else:
                    killed_ports[f.socket.local.port] = killed_ports.get(f.socket.local.port, 0) + 1
                since = watched.expired_at.get(f.socket.nat_reply_tuple)
                first = watched.leaked_since.get(f.socket.cookie, wall)
                start = min(since, first) if since is not None else first
                lifetime = max(0.0, wall - start)
                self.metrics.leak_lifetime.observe(lifetime)
                self.lifetimes.append(lifetime)
                self.metrics.killed.labels(ns, pod).inc()
            elif o.outcome is Outcome.EXTENDED:
                extended += 1
                self.metrics.extended.labels(ns, pod).inc()
            elif o.outcome is Outcome.FAILED:
                reason = o.error or "unknown"
                failures[reason] = failures.get(reason, 0) + 1
                self.metrics.kill_failures.labels(ns, pod, reason).inc()
        watched.prune_expiries(wall)
        gone = {c for c, o in outcomes.items() if o.outcome is Outcome.KILLED}
        watched.leaked_since = {
            c: t for c, t in watched.leaked_since.items() if c in seen_now and c not in gone
        }
        gone_now = {c for c, o in outcomes.items() if o.outcome is Outcome.KILLED}

        def left(kind: Kind) -> int:
            return sum(
                1 for f in result.findings if f.kind is kind and f.socket.cookie not in gone_now
            )

        leaked_now, collisions_now = left(Kind.LEAKED), left(Kind.COLLISION)
        self.metrics.leaked.labels(ns, pod).set(leaked_now + collisions_now)
        self.metrics.at_risk.labels(ns, pod).set(len(at_risk))
        self._collision_events(state, unblocked, [f for f in fresh if f not in unblocked])
        plain = killed - len(unblocked)
        if plain:
            ports_text = ", ".join(f":{p}" for p in sorted(killed_ports))
            self._event(
                state,
                "LeakedSocketsKilled",
                f"Killed {plain} leaked half-closed socket{'s' if plain != 1 else ''} "
                f"on {ports_text}",
            )
        if failures:
            detail = ", ".join(f"{n} {r}" for r, n in sorted(failures.items()))
            self._event(state, "KillFailed", f"Could not kill leaked sockets: {detail}", "Warning")
        if extended:
            self._event(
                state,
                "ConntrackEntriesExtended",
                f"Extended {extended} conntrack entr{'ies' if extended != 1 else 'y'} of "
                "half-closed proxy connections",
            )
        findings = [
            report_finding(f, outcomes.get(f.socket.cookie), stamp) for f in result.findings
        ]
        self._report(
            state,
            policy,
            ScanSummary(
                scanned_at=scanned_at,
                leaked=leaked_now,
                collision=collisions_now,
                at_risk=len(at_risk),
                unproven=left(Kind.UNPROVEN),
                killed=killed,
                extended=extended,
                conntrack_patched=watched.sysctl_patched,
                findings=findings,
            ),
        )

    def _record_unproven(self, ns: str, pod: str, findings: list[Finding]) -> None:
        """``halfclose_unproven_sockets{reason}``: one series per reason seen, none at 0."""
        counts: dict[UnprovenReason, int] = {}
        for f in findings:
            if f.kind is Kind.UNPROVEN and f.reason is not None:
                counts[f.reason] = counts.get(f.reason, 0) + 1
        for reason in UnprovenReason:
            n = counts.get(reason, 0)
            if n:
                self.metrics.unproven.labels(ns, pod, reason.value).set(n)
            else:
                with contextlib.suppress(KeyError):
                    self.metrics.unproven.remove(ns, pod, reason.value)

    def _collision_events(
        self, state: PodState, killed: list[Finding], left: list[Finding]
    ) -> None:
        """Say which connect a kill unblocked, or which one hangs (not killed)."""
        for f in killed[:MAX_COLLISION_EVENTS]:
            self._event(state, "CollisionUnblocked", f"Killed stale socket {collision_text(f)}")
        if len(killed) > MAX_COLLISION_EVENTS:
            more = len(killed) - MAX_COLLISION_EVENTS
            self._event(
                state,
                "CollisionUnblocked",
                f"Killed {more} more stale sockets blocking new connections",
            )
        for f in left[:MAX_COLLISION_EVENTS]:
            self._event(
                state,
                "PortReuseCollision",
                f"Stale socket {collision_text(f)} (not killed)",
                "Warning",
            )

    def _report(self, state: PodState, policy: Policy, summary: ScanSummary) -> None:
        status = build_report_status(
            summary,
            state.status,
            leaked_alert_threshold=policy.spec.thresholds.leaked_per_pod_alert,
        )
        # Unproven findings keep a report too: users see them, nobody acts on them.
        clean = (
            status.leaked == 0
            and status.collision == 0
            and status.at_risk == 0
            and status.unproven == 0
        )
        if (
            clean
            and status.killed_total == 0
            and status.extended_total == 0
            and not status.conntrack_patched
        ):
            if state.status is not None:
                # Clean again and nothing was ever done: no report at all.
                state.status = None
                state.reported = None
                t = state.target
                self.reports.submit(ReportUpdate(PodRef(t.namespace, t.name, t.uid), None, None))
            return
        if clean:
            # Cleared: counts at zero; what was acted on stays as history.
            status = ReportStatus(
                leaked=0,
                at_risk=0,
                killed_total=status.killed_total,
                extended_total=status.extended_total,
                conntrack_patched=status.conntrack_patched,
                last_scan_time=status.last_scan_time,
                findings=tuple(f for f in status.findings if f.action != "none"),
                conditions=status.conditions,
            )
        state.status = status
        fingerprint: tuple[object, ...] = (
            status.leaked,
            status.collision,
            status.at_risk,
            status.unproven,
            status.killed_total,
            status.extended_total,
            status.conntrack_patched,
            tuple((f.identity, f.kind, f.action) for f in status.findings),
            policy.name,
        )
        now = self.clock()
        if fingerprint == state.reported and now - state.reported_at < REPORT_REFRESH_SECONDS:
            return
        state.reported, state.reported_at = fingerprint, now
        t = state.target
        manifest = report_manifest(
            namespace=t.namespace,
            pod_name=t.name,
            pod_uid=t.uid,
            node_name=self.settings.node_name,
            policy=policy.name,
        )
        self.reports.submit(
            ReportUpdate(PodRef(t.namespace, t.name, t.uid), manifest, report_status_json(status))
        )

    def _event(self, state: PodState, reason: str, message: str, type_: str = "Normal") -> None:
        t = state.target
        self.reports.event(
            PodEvent(PodRef(t.namespace, t.name, t.uid), reason, message, type_, at=self.wall())
        )

    # -- shutdown -------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Close every netns.  Patched sysctls stay patched (and recorded) on
        purpose: a restarting agent must not open a window in which leaks form;
        the records let the next run restore them when the policy goes."""
        for watched in self.netns.values():
            watched.close()
        self.netns.clear()
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_r = self._wake_w = -1
