"""The agent: a delay queue of netns, and reconcilers (controller-runtime's shape).

Concurrency model (threads, not asyncio): the work is blocking syscalls
(netlink, setns, /proc), which asyncio would have to push to threads anyway.
One *loop thread* runs every reconcile; the Kubernetes watches, the report
writer and the HTTP server each run on their own thread and reach the loop
only through ``notify()`` (and the writer's queue).

Two reconcilers:
- **pods** (``PodReconciler``, on a watch change or every ``RECONCILE_SECONDS``):
  matched pods -> their netns (``Kernel.resolve``), opens new netns, lets go of
  unwanted ones, restores orphaned sysctl patches;
- **netns** (``NetnsReconciler``, keyed by netns inode on the ``DelayQueue``):
  scan, plan, act, record, and return when it next needs to run
  (``schedule.next_delay``: expiry predictions, ripening leaks, the interval,
  backoff, a kill's deferred upstream check).

Events only enqueue keys: a conntrack DESTROY of a proxied entry -> the netns
after ``event_debounce_seconds`` (a burst is one reconcile); an UPDATE into
CLOSE_WAIT -> at its predicted expiry; a NEW entry under a stale socket's
reply tuple -> now (a collision, istio#43301).  The queue hands out due keys
earliest first, so every netns with due work is served in turn.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable

from halfclose.agent.core.reasons import error_reason
from halfclose.agent.daemon.kernel import LocalKernel
from halfclose.agent.daemon.metrics import AgentMetrics
from halfclose.agent.daemon.pods import PodReconciler, action_settings, wants_sysctl
from halfclose.agent.daemon.ports import Kernel, ReportSink, World
from halfclose.agent.daemon.queue import DelayQueue
from halfclose.agent.daemon.reconcile import NetnsReconciler
from halfclose.agent.daemon.record import Recorder
from halfclose.agent.daemon.remediate import EngineRemediator
from halfclose.agent.daemon.settings import AgentSettings
from halfclose.agent.daemon.watched import WatchedNetns, new_warnings
from halfclose.agent.kernel.podnetns import PodNetnsResolver, PodNetnsSource

log = logging.getLogger(__name__)

# Pods whose containers have not resolved to a netns yet are retried this often.
RECONCILE_SECONDS = 5.0
# At most this many netns reconciles per pass: the loop then looks at events
# and the pods again, so a large due batch never hides a collision for long.
MAX_RECONCILES_PER_PASS = 32
# ... and for at most about this long: conntrack events wait while reconciles
# run, and an event drained late is a leak killed late (a scan can take tens
# of milliseconds on a loaded node; a re-check about one).
PASS_SECONDS = 0.05
# Routine work (an interval scan: tens of milliseconds, more on a loaded node)
# starts only when no urgent work comes due within this long.
ROUTINE_GUARD_SECONDS = 0.2

# The decisions the tests reach through this module's old names.
__all__ = ["Agent", "action_settings", "error_reason", "new_warnings", "wants_sysctl"]


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        metrics: AgentMetrics,
        world: World,
        reports: ReportSink,
        kernel: Kernel | EngineRemediator,
        *,
        resolver: PodNetnsSource | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(kernel, EngineRemediator):
            # The in-process kernel side around the given engine (tests, bench).
            kernel = LocalKernel(
                kernel, resolver or PodNetnsResolver(settings.host_proc), settings.host_proc
            )
        self.settings = settings
        self.metrics = metrics
        self.kernel: Kernel = kernel
        self.clock = clock
        self.queue: DelayQueue[int] = DelayQueue()
        self.netns: dict[int, WatchedNetns] = {}
        # Raw leak lifetimes for the benchmark (the histogram has buckets only).
        self.lifetimes: deque[float] = deque(maxlen=100_000)
        recorder = Recorder(
            metrics,
            reports,
            node_name=settings.node_name,
            clock=clock,
            wall=wall,
            on_lifetime=self.lifetimes.append,
        )
        self.pods = PodReconciler(
            settings,
            metrics,
            world=world,
            reports=reports,
            kernel=self.kernel,
            recorder=recorder,
            queue=self.queue,
            netns=self.netns,
            clock=clock,
        )
        self.reconciler = NetnsReconciler(
            settings,
            metrics,
            kernel=self.kernel,
            recorder=recorder,
            pods=self.pods,
            clock=clock,
            wall=wall,
        )
        self.last_pass = clock()
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._changed.set()
        self._wake_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._next_pods = 0.0

    @property
    def scans(self) -> int:
        return self.reconciler.scans

    # -- called from other threads --------------------------------------------------

    def notify(self) -> None:
        """The watched world changed: reconcile the pods at the next pass."""
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
        """One pass: the pods if needed, the due netns (fairly), then wait for the next thing."""
        now = self.clock()
        self.last_pass = now
        if self._changed.is_set() or now >= self._next_pods or self.pods.wants_pass:
            self._changed.clear()
            self._next_pods = now + RECONCILE_SECONDS
            try:
                self.pods.reconcile()
            except Exception:
                log.exception("reconcile of pods failed")
                self.metrics.scan_errors.labels(reason="internal").inc()
        started = self.clock()
        for _ in range(MAX_RECONCILES_PER_PASS):
            # One at a time: a pass cut short leaves the rest queued.
            popped = self.queue.pop_due(self.clock(), 1, guard=ROUTINE_GUARD_SECONDS)
            if not popped:
                break
            inode = popped[0]
            watched = self.netns.get(inode)
            if watched is None or self._stop.is_set():
                continue
            try:
                delay = self.reconciler.reconcile(watched)
            except Exception:
                # A bug, not a kernel or API fault (those are handled inside):
                # keep the loop, and every other netns, going.
                log.exception("reconcile of netns %d failed", inode)
                self.metrics.scan_errors.labels(reason="internal").inc()
                self.queue.add_after(inode, RECONCILE_SECONDS, self.clock())
            else:
                self._requeue(inode, watched, delay)
            if self.clock() - started >= PASS_SECONDS:
                break  # drain the events (and see the pods) before more work
        self._wait(max_wait)

    def _requeue(self, inode: int, watched: WatchedNetns, delay: float) -> None:
        """Back in the queue: its urgent work (re-checks, event scans) as urgent,
        its interval scan or upstream check as routine (served after urgent work)."""
        now = self.clock()
        urgent = self.reconciler.urgent_delay(watched)
        if urgent is not None:
            self.queue.add_after(inode, urgent, now)
        if urgent is None or delay < urgent:
            self.queue.add_after(inode, delay, now, routine=True)

    def _wait(self, max_wait: float) -> None:
        now = self.clock()
        deadline = min(now + max_wait, self._next_pods)
        due = self.queue.next_due(ROUTINE_GUARD_SECONDS, now)
        if due is not None:
            deadline = min(deadline, due)
        timeout = max(0.0, deadline - now)
        by_fd = {w.events_fd: w for w in self.netns.values() if w.events_fd is not None}
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
            watched = by_fd[fd]
            for inode, delay in self.reconciler.on_events(watched):
                self.queue.add_after(inode, delay, self.clock())

    # -- shutdown -------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Close every netns.  Patched sysctls stay patched (and recorded) on
        purpose: a restarting agent must not open a window in which leaks form;
        the records let the next run restore them when the policy goes."""
        for inode in list(self.netns):
            with contextlib.suppress(Exception):
                self.kernel.close_netns(inode)
        self.netns.clear()
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_r = self._wake_w = -1
