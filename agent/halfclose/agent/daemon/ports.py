"""The two doors the agent's reconcilers go through: the kernel and the cluster.

The reconcilers (``halfclose.agent.daemon``) decide; everything they need
from the node or the API server comes through these Protocols, injected at
the composition root (``daemon/main.py``).  So the decisions — when to scan,
what to kill under which budget, when to patch or restore a sysctl, what to
report and when — run in unit tests against ``FakeKernel`` and the kube fake,
without root.

``Kernel`` is shaped to cross a process boundary (the privileged worker,
JSON over a socketpair): netns are named by inode, arguments and results are
plain frozen dataclasses (``ScanSettings``, ``ScanResult``, ``Plan``,
``ActionReport``, ``PatchReport``, ``ConntrackEvent``) or ints/bools, and
failures are the typed errors of ``halfclose.errors`` (``NetnsGone``,
``PermissionDenied``, ``RulesUnreadable``, ``ConntrackUnavailable``), which
keep their class across the boundary by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from halfclose.agent.core.model import SocketRecord
from halfclose.agent.core.outcome import ActionReport, PatchReport
from halfclose.agent.core.plan import Plan
from halfclose.agent.engine.scan import ScanResult, ScanSettings
from halfclose.agent.kernel.ctevents import ConntrackEvent
from halfclose.agent.kernel.podnetns import PodNetns
from halfclose.agent.kube.events import PodEvent
from halfclose.agent.kube.reports import ReportUpdate


@dataclass(frozen=True, slots=True)
class OpenedNetns:
    """A netns the kernel side now holds open (by inode, until ``close_netns``).

    ``events_fd`` is a conntrack event socket to wait on (``poll``) and hand to
    ``drain_events``: None when events are unavailable (the interval still
    finds every leak, later).  Across a process boundary it is a passed fd.
    """

    inode: int
    label: str
    events_fd: int | None


@dataclass(frozen=True, slots=True)
class EventBatch:
    events: tuple[ConntrackEvent, ...]
    overflowed: bool  # the socket's buffer overran: some events were lost


class Kernel(Protocol):
    """Everything the reconcilers ask of the node's kernel."""

    # -- where pods live ---------------------------------------------------------
    def resolve(
        self,
        container_ids: frozenset[str],
        pod_ips: Iterable[str] = (),
        host_ips: Iterable[str] = (),
    ) -> PodNetns | None:
        """The pod's netns, or None while its containers have not started."""

    def invalidate(self) -> None:
        """Forget cached pod -> netns answers (a netns went away)."""

    def host_netns_inodes(self) -> frozenset[int]:
        """The node's own netns: never scanned for a pod."""

    # -- one netns -----------------------------------------------------------------
    def open_netns(self, inode: int, path: str) -> OpenedNetns:
        """Hold the netns at ``path`` open; raises NetnsGone if it is not ``inode`` any more."""

    def close_netns(self, inode: int) -> None: ...

    def scan(self, inode: int, settings: ScanSettings) -> ScanResult: ...

    def attach_owners(self, inode: int, result: ScanResult) -> ScanResult:
        """``result`` with its findings' owning processes (one /proc pass); for scans
        run with ``ScanSettings(owners=False)``, only for the findings to be reported."""

    def recheck(
        self, inode: int, sockets: tuple[SocketRecord, ...], settings: ScanSettings
    ) -> ScanResult | None:
        """The proof again for just these sockets (``engine/recheck.py``): their
        findings as a scan would judge them now, or None when only a scan can."""

    def remediate(self, inode: int, plan: Plan, watch_unpaired: bool = True) -> ActionReport:
        """Re-check and carry out the plan; never waits for upstream legs.

        A kill's upstream verification comes back as ``ActionReport.pending``;
        the reconciler calls ``verify_upstreams`` once it is due.  With
        ``watch_unpaired`` False only kills with a known upstream leg are
        verified (no CLOSE_WAIT baseline dump before the kills).
        """

    def verify_upstreams(self, inode: int, report: ActionReport) -> ActionReport:
        """One CLOSE_WAIT dump: ``report`` with ``kills`` and ``upstream_closed`` filled in."""

    def drain_events(self, inode: int) -> EventBatch: ...

    def watch_new(self, inode: int, on: bool) -> None:
        """Join (or leave) the conntrack NEW group: only while stale sockets exist."""

    # -- the Sysctl strategy ---------------------------------------------------------
    def patch_sysctl(self, inode: int, timeout: int) -> PatchReport: ...

    def restore_sysctl(self, inode: int) -> PatchReport: ...

    def restore_inode(self, inode: int) -> bool:
        """Restore a record whose netns is not held (found by inode), or drop it if gone."""

    def patched_inodes(self) -> frozenset[int]: ...


class World(Protocol):
    """What the Kubernetes watches provide (``agent.kube.world`` or the fake)."""

    def policies(self) -> list[Mapping[str, Any]]: ...
    def pods(self) -> list[Mapping[str, Any]]: ...
    def namespace_labels(self) -> dict[str, Mapping[str, str]]: ...
    def synced(self) -> bool: ...
    def previous_report(self, namespace: str, name: str) -> Mapping[str, Any] | None: ...


class ReportSink(Protocol):
    """Where reports and Events go (the buffered writer, or a list in tests)."""

    def submit(self, update: ReportUpdate) -> None: ...
    def event(self, event: PodEvent) -> None: ...
