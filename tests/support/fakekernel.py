"""``FakeKernel``: the agent's ``Kernel`` Protocol in memory, for unit tests without root.

Scripted per netns inode: what ``resolve`` answers for a container ID, what the
next ``scan`` returns (or raises), which events are queued.  Everything the
reconcilers asked is recorded (``calls``), and ``remediate`` applies the plan
the way the engine reports it (kills succeed unless told otherwise), with the
upstream check left pending like the real kernel side.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from halfclose.agent.core.model import Outcome, SocketRecord
from halfclose.agent.core.outcome import (
    ActionReport,
    FindingOutcome,
    KillSummary,
    PatchReport,
    UpstreamCheck,
)
from halfclose.agent.core.plan import ActionKind, Op, Plan
from halfclose.agent.daemon.ports import EventBatch, OpenedNetns
from halfclose.agent.engine.scan import ScanResult, ScanSettings
from halfclose.agent.kernel.ctevents import ConntrackEvent
from halfclose.agent.kernel.podnetns import PodNetns
from halfclose.errors import NetnsGone


@dataclass
class FakeNetns:
    inode: int
    path: str
    results: list[ScanResult | BaseException] = field(default_factory=list)
    events: list[ConntrackEvent] = field(default_factory=list)
    overflowed: bool = False
    watching_new: bool = False
    sysctl: int = 60
    open_error: BaseException | None = None
    kill_errors: dict[int, str] = field(default_factory=dict)  # cookie -> errno name
    # What the next ``recheck`` returns (None: "only a scan can decide"), in order.
    rechecks: list[ScanResult | BaseException | None] = field(default_factory=list)


class FakeKernel:
    def __init__(self, host: Iterable[int] = (1,)) -> None:
        self.by_container: dict[str, FakeNetns] = {}
        self.netns: dict[int, FakeNetns] = {}
        self.held: set[int] = set()
        self.patched: dict[int, int] = {}  # inode -> original
        self.calls: list[tuple[str, int]] = []
        self.plans: list[tuple[int, Plan]] = []
        self.rechecked: list[tuple[int, tuple[SocketRecord, ...]]] = []
        self._host = frozenset(host)
        self._fd = 1000

    # -- scripting ----------------------------------------------------------------------

    def add(self, container_id: str, inode: int) -> FakeNetns:
        ns = self.netns.get(inode) or FakeNetns(inode, f"/fake/netns/{inode}")
        self.netns[inode] = ns
        self.by_container[container_id] = ns
        return ns

    # -- the Protocol -----------------------------------------------------------------------

    def resolve(
        self,
        container_ids: frozenset[str],
        pod_ips: Iterable[str] = (),
        host_ips: Iterable[str] = (),
    ) -> PodNetns | None:
        for cid in sorted(container_ids):
            ns = self.by_container.get(cid)
            if ns is not None:
                return PodNetns(ns.inode, 0, ns.path)
        return None

    def invalidate(self) -> None:
        self.calls.append(("invalidate", 0))

    def host_netns_inodes(self) -> frozenset[int]:
        return self._host

    def open_netns(self, inode: int, path: str) -> OpenedNetns:
        self.calls.append(("open", inode))
        ns = self.netns[inode]
        if ns.open_error is not None:
            raise ns.open_error
        self.held.add(inode)
        self._fd += 1
        return OpenedNetns(inode, path, None)

    def close_netns(self, inode: int) -> None:
        self.calls.append(("close", inode))
        self.held.discard(inode)

    def _ns(self, inode: int) -> FakeNetns:
        if inode not in self.held:
            raise NetnsGone(f"netns {inode} is not held open")
        return self.netns[inode]

    def scan(self, inode: int, settings: ScanSettings) -> ScanResult:
        self.calls.append(("scan", inode))
        ns = self._ns(inode)
        if not ns.results:
            return ScanResult(ns.path, (15001,), 0, 0.001, [])
        item = ns.results.pop(0) if len(ns.results) > 1 else ns.results[0]
        if isinstance(item, BaseException):
            raise item
        return item

    def attach_owners(self, inode: int, result: ScanResult) -> ScanResult:
        self.calls.append(("owners", inode))
        self._ns(inode)
        return result

    def recheck(
        self, inode: int, sockets: tuple[SocketRecord, ...], settings: ScanSettings
    ) -> ScanResult | None:
        self.calls.append(("recheck", inode))
        self.rechecked.append((inode, sockets))
        ns = self._ns(inode)
        item = ns.rechecks.pop(0) if ns.rechecks else None
        if isinstance(item, BaseException):
            raise item
        return item

    def remediate(self, inode: int, plan: Plan, watch_unpaired: bool = True) -> ActionReport:
        self.calls.append(("remediate", inode))
        self.plans.append((inode, plan))
        ns = self._ns(inode)
        outcomes = []
        for d in plan.decisions:
            cookie = d.finding.socket.cookie
            if d.op is Op.KILL and plan.settings.dry_run:
                outcomes.append(FindingOutcome(d.finding, Outcome.SKIPPED, would=Op.KILL))
            elif d.op is Op.KILL and cookie in ns.kill_errors:
                outcomes.append(
                    FindingOutcome(d.finding, Outcome.FAILED, error=ns.kill_errors[cookie])
                )
            elif d.op is Op.KILL:
                outcomes.append(FindingOutcome(d.finding, Outcome.KILLED))
            elif d.op is Op.EXTEND:
                outcomes.append(FindingOutcome(d.finding, Outcome.EXTENDED))
            else:
                outcomes.append(FindingOutcome(d.finding, Outcome.SKIPPED, d.reason))
        report = ActionReport(plan.settings.action, plan.settings.dry_run, tuple(outcomes))
        if plan.settings.action is ActionKind.KILL and report.killed and not watch_unpaired:
            return report.replace(kills=KillSummary(killed=report.killed))
        if plan.settings.action is ActionKind.KILL and report.killed:
            check = UpstreamCheck((), report.killed, frozenset(), frozenset())
            report = report.replace(pending=check)
        return report

    def verify_upstreams(self, inode: int, report: ActionReport) -> ActionReport:
        self.calls.append(("verify", inode))
        return report.replace(kills=KillSummary(killed=report.killed), pending=None)

    def drain_events(self, inode: int) -> EventBatch:
        ns = self._ns(inode)
        out, ns.events = tuple(ns.events), []
        overflowed, ns.overflowed = ns.overflowed, False
        return EventBatch(out, overflowed)

    def watch_new(self, inode: int, on: bool) -> None:
        self._ns(inode).watching_new = on

    def patch_sysctl(self, inode: int, timeout: int) -> PatchReport:
        self.calls.append(("patch", inode))
        ns = self._ns(inode)
        before = ns.sysctl
        self.patched.setdefault(inode, before)
        ns.sysctl = timeout
        return PatchReport(
            ns.path, inode, "patch", before, timeout, before, before != timeout, False, ""
        )

    def restore_sysctl(self, inode: int) -> PatchReport:
        self.calls.append(("restore", inode))
        ns = self._ns(inode)
        before = ns.sysctl
        original = self.patched.pop(inode, None)
        if original is not None:
            ns.sysctl = original
        return PatchReport(
            ns.path, inode, "restore", before, ns.sysctl, original, original is not None, False, ""
        )

    def restore_inode(self, inode: int) -> bool:
        self.calls.append(("restore-inode", inode))
        original = self.patched.pop(inode, None)
        if original is not None and inode in self.netns:
            self.netns[inode].sysctl = original
        return original is not None

    def patched_inodes(self) -> frozenset[int]:
        return frozenset(self.patched)
