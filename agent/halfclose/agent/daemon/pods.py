"""The pod reconciler: matched pods -> watched netns (and the sysctl records' lifecycle).

Runs on the loop thread after a watch change, and every few seconds for pods
whose containers have not resolved yet.  It only opens/closes netns and
enqueues them; the scanning is the netns reconciler's (``reconcile.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from halfclose.agent.core.plan import ActionKind, ActionSettings
from halfclose.agent.core.ratelimit import TokenBucket
from halfclose.agent.core.reasons import error_reason
from halfclose.agent.daemon.metrics import AgentMetrics
from halfclose.agent.daemon.ports import Kernel, ReportSink, World
from halfclose.agent.daemon.queue import DelayQueue
from halfclose.agent.daemon.record import PodState, Recorder
from halfclose.agent.daemon.settings import AgentSettings
from halfclose.agent.daemon.targets import PodKey, PodTarget, parse_policies, pod_targets
from halfclose.agent.daemon.watched import WatchedNetns
from halfclose.agent.kube.reports import PodRef, ReportUpdate
from halfclose.api.policy import KILL_SOCKETS, PATCH_CONNTRACK, Policy
from halfclose.api.report import ReportError, ReportStatus, parse_report
from halfclose.errors import UserError

log = logging.getLogger(__name__)


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


def kill_budget_per_minute(policies: list[Policy]) -> int:
    """One node-wide budget: the tightest maxKillsPerMinute of the policies that kill
    (the field is "per node"; with several, the strictest wins)."""
    limits = [
        p.spec.thresholds.max_kills_per_minute for p in policies if p.spec.action == KILL_SOCKETS
    ]
    return min(limits) if limits else 0


class PodReconciler:
    def __init__(
        self,
        settings: AgentSettings,
        metrics: AgentMetrics,
        *,
        world: World,
        reports: ReportSink,
        kernel: Kernel,
        recorder: Recorder,
        queue: DelayQueue[int],
        netns: dict[int, WatchedNetns],
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.world = world
        self.reports = reports
        self.kernel = kernel
        self.recorder = recorder
        self.queue = queue
        self.netns = netns
        self.clock = clock
        self.states: dict[PodKey, PodState] = {}
        self.bucket: TokenBucket | None = None  # the node-wide kill budget
        self.wants_pass = False  # a netns went away: re-resolve at the next pass
        self._refused: set[PodKey] = set()  # pods refused for the host netns (logged once)

    def owner(self, watched: WatchedNetns) -> PodState | None:
        key = watched.owner
        return self.states.get(key) if key is not None else None

    def interval(self, watched: WatchedNetns) -> float:
        states = [self.states[k] for k in watched.pods if k in self.states]
        if not states:
            return self.settings.default_scan_interval_seconds
        seconds: int = min(s.target.policy.spec.scan_interval_seconds for s in states)
        return float(seconds)

    def reconcile(self) -> None:
        self.wants_pass = False
        policies = parse_policies(self.world.policies())
        targets = pod_targets(
            policies, self.world.pods(), self.world.namespace_labels(), self.settings.node_name
        )
        per_minute = kill_budget_per_minute(policies)
        if self.bucket is None:
            self.bucket = TokenBucket(per_minute=per_minute, now=self.clock())  # starts full
        elif self.bucket.per_minute != per_minute:
            self.bucket.resize(per_minute, self.clock())
        host = self.kernel.host_netns_inodes()
        # Group pods by netns inode (pods sharing one are scanned once).
        wanted: dict[int, tuple[str, list[PodKey]]] = {}
        refused: set[PodKey] = set()
        for key, target in sorted(targets.items()):
            where = self.kernel.resolve(target.container_ids, target.pod_ips, target.host_ips)
            if where is None:
                continue
            if where.inode in host:
                refused.add(key)
                continue
            wanted.setdefault(where.inode, (where.path, []))[1].append(key)
        # Pods that left: forget their series and reports.
        for key in [k for k in self.states if k not in targets]:
            self._drop_pod(key, pod_gone=not self._pod_exists(key))
        for key, target in targets.items():
            if key in self.states:
                self.states[key].target = target
            else:
                self.states[key] = PodState(target, status=self._previous_status(target))
                # At 0 from the start: the collision alert takes increase() of it,
                # and a series born at 1 shows no increase for the first collision.
                self.metrics.collisions.labels(*key)
        for key in sorted(refused - self._refused):
            self._refuse_host_netns(self.states[key])
        self._refused = refused
        # Netns nobody wants any more: put the sysctl back, then let go.
        for inode in [i for i in self.netns if i not in wanted]:
            leaving = self.netns[inode]
            if leaving.sysctl_patched:
                self.restore_sysctl(leaving)
            self.close(inode)
        now = self.clock()
        for inode, (path, keys) in wanted.items():
            watched = self.netns.get(inode)
            if watched is None:
                watched = self._open(inode, path, keys)
                if watched is None:
                    continue
                self.queue.add_after(inode, 0.0, now)  # a new pod may have leaks already
            else:
                watched.pods = keys
                watched.scan_at = min(watched.scan_at, now + self.interval(watched))
                self.queue.add_after(inode, self.interval(watched), now)
            owner = self.states[keys[0]].target.policy
            if watched.sysctl_patched and not wants_sysctl(owner):
                self.restore_sysctl(watched)  # the policy changed action or strategy
        self.metrics.state.watched_netns = len(self.netns)
        self._restore_orphan_sysctls()

    def _open(self, inode: int, path: str, keys: list[PodKey]) -> WatchedNetns | None:
        try:
            opened = self.kernel.open_netns(inode, path)
        except (UserError, OSError) as exc:
            reason = error_reason(exc)
            log.warning("cannot watch netns %s of %s: %s: %s", path, keys, reason, exc)
            self.metrics.scan_errors.labels(reason=reason).inc()
            self.kernel.invalidate()
            return None
        log.info("watching netns %d (%s) for %s", inode, path, ", ".join("/".join(k) for k in keys))
        watched = WatchedNetns(inode, path, keys, events_fd=opened.events_fd)
        self.netns[inode] = watched
        return watched

    def close(self, inode: int) -> None:
        self.netns.pop(inode, None)
        self.queue.forget(inode)
        log.info("no longer watching netns %d", inode)
        try:
            self.kernel.close_netns(inode)
        except (UserError, OSError) as exc:
            log.warning("closing netns %d: %s", inode, exc)

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
        self.recorder.event(
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

    def _drop_pod(self, key: PodKey, pod_gone: bool) -> None:
        state = self.states.pop(key)
        self.metrics.forget_pod(*key)
        if state.status is not None and not pod_gone:
            # The pod still exists but no policy applies any more: its report goes.
            # (A deleted pod's report is garbage-collected through its owner.)
            self.reports.submit(ReportUpdate(PodRef(key[0], key[1], state.target.uid), None, None))

    # -- the sysctl records ---------------------------------------------------------------

    def restore_sysctl(self, watched: WatchedNetns) -> None:
        try:
            self.kernel.restore_sysctl(watched.inode)
            watched.sysctl_patched = False
            log.info("action=restore-sysctl netns=%d outcome=ok", watched.inode)
        except (OSError, UserError) as exc:
            reason = error_reason(exc)
            log.warning(
                "action=restore-sysctl netns=%d outcome=failed reason=%s: %s",
                watched.inode,
                reason,
                exc,
            )
            self.metrics.scan_errors.labels(reason=reason).inc()
        self.metrics.state.patched_pods = len(self.kernel.patched_inodes())

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
            owner = self.owner(watched)
            if owner is not None and wants_sysctl(owner.target.policy):
                mine.add(watched.inode)
        patched = self.kernel.patched_inodes()
        for inode in patched - mine:
            held = self.netns.get(inode)
            try:
                if held is not None:
                    self.restore_sysctl(held)
                else:
                    self.kernel.restore_inode(inode)
            except (OSError, UserError) as exc:
                log.warning("restoring the close_wait sysctl of netns %d: %s", inode, exc)
        patched = self.kernel.patched_inodes()
        for watched in self.netns.values():
            if watched.inode in mine and watched.inode in patched:
                watched.sysctl_patched = True  # adopted from an earlier run
        self.metrics.state.patched_pods = len(patched)
