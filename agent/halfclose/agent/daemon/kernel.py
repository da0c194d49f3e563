"""``LocalKernel``: the agent's ``Kernel`` Protocol, in this process.

It holds what a watched netns needs on the kernel side — the netns handle,
its ``Scanner`` (netlink sockets opened inside it) and its conntrack event
socket — keyed by inode, so the reconcilers never hold a handle.  H-SEC's
privileged worker serves these same methods across a socketpair.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from halfclose.agent.core.model import SocketRecord
from halfclose.agent.core.outcome import ActionReport, PatchReport
from halfclose.agent.core.plan import Plan
from halfclose.agent.daemon.hostnetns import host_netns_inodes
from halfclose.agent.daemon.ports import EventBatch, OpenedNetns
from halfclose.agent.daemon.remediate import EngineRemediator
from halfclose.agent.engine.recheck import recheck
from halfclose.agent.engine.scan import Scanner, ScanResult, ScanSettings, attach_owners
from halfclose.agent.kernel.ctevents import COUNTDOWN_STATES, ConntrackEventSocket
from halfclose.agent.kernel.netlink import NETLINK_NETFILTER, open_socket
from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.agent.kernel.podnetns import PodNetns, PodNetnsSource
from halfclose.errors import NetnsGone

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Held:
    handle: NetnsHandle
    scanner: Scanner
    events: ConntrackEventSocket | None

    def close(self) -> None:
        for closer in (self.scanner.close, self.events.close if self.events else None):
            if closer is not None:
                with contextlib.suppress(OSError):
                    closer()
        with contextlib.suppress(OSError):
            self.handle.close()


class LocalKernel:
    def __init__(
        self, remediator: EngineRemediator, resolver: PodNetnsSource, host_proc: str = "/proc"
    ) -> None:
        self.remediator = remediator
        self.resolver = resolver
        self.host_proc = host_proc
        self._held: dict[int, _Held] = {}
        self._host = host_netns_inodes(host_proc)

    # -- where pods live ---------------------------------------------------------------

    def resolve(
        self,
        container_ids: frozenset[str],
        pod_ips: Iterable[str] = (),
        host_ips: Iterable[str] = (),
    ) -> PodNetns | None:
        return self.resolver.resolve(container_ids, pod_ips, host_ips)

    def invalidate(self) -> None:
        self.resolver.invalidate()

    def host_netns_inodes(self) -> frozenset[int]:
        return self._host

    # -- one netns ----------------------------------------------------------------------

    def open_netns(self, inode: int, path: str) -> OpenedNetns:
        handle = NetnsHandle.from_path(path)
        try:
            if handle.inode != inode:
                raise NetnsGone(f"{path} changed netns while opening")  # pid reused
            scanner = Scanner(handle)
        except BaseException:
            handle.close()
            raise
        events: ConntrackEventSocket | None = None
        try:
            events = ConntrackEventSocket(open_socket(NETLINK_NETFILTER, handle))
        except OSError as exc:
            # Without events the poll interval still finds every leak, later.
            log.warning("no conntrack events for netns %s: %s", path, exc)
        old = self._held.pop(inode, None)
        if old is not None:
            old.close()
        self._held[inode] = _Held(handle, scanner, events)
        return OpenedNetns(inode, handle.label, events.fileno() if events else None)

    def close_netns(self, inode: int) -> None:
        held = self._held.pop(inode, None)
        if held is not None:
            held.close()

    def close_all(self) -> None:
        for inode in list(self._held):
            self.close_netns(inode)

    def _get(self, inode: int) -> _Held:
        held = self._held.get(inode)
        if held is None:
            raise NetnsGone(f"netns {inode} is not held open")
        return held

    def scan(self, inode: int, settings: ScanSettings) -> ScanResult:
        return self._get(inode).scanner.scan(settings)

    def attach_owners(self, inode: int, result: ScanResult) -> ScanResult:
        self._get(inode)  # the netns is still held: its sockets' holders are alive
        return attach_owners([result], proc_root=self.host_proc)[0]

    def recheck(
        self, inode: int, sockets: tuple[SocketRecord, ...], settings: ScanSettings
    ) -> ScanResult | None:
        return recheck(self._get(inode).scanner, sockets, settings)

    def remediate(self, inode: int, plan: Plan, watch_unpaired: bool = True) -> ActionReport:
        return self.remediator.execute(self._get(inode).scanner, plan, watch_unpaired)

    def verify_upstreams(self, inode: int, report: ActionReport) -> ActionReport:
        return self.remediator.verify(self._get(inode).scanner, report)

    def drain_events(self, inode: int) -> EventBatch:
        events = self._get(inode).events
        if events is None:
            return EventBatch((), False)
        # UPDATEs matter only into CLOSE_WAIT (a leak's countdown starts);
        # the others are skipped before their tuples are decoded.
        got, overflowed = events.drain(update_states=COUNTDOWN_STATES)
        return EventBatch(tuple(got), overflowed)

    def watch_new(self, inode: int, on: bool) -> None:
        events = self._get(inode).events
        if events is not None:
            events.watch_new(on)

    # -- the Sysctl strategy --------------------------------------------------------------

    def patch_sysctl(self, inode: int, timeout: int) -> PatchReport:
        return self.remediator.patch_sysctl(self._get(inode).handle, timeout)

    def restore_sysctl(self, inode: int) -> PatchReport:
        return self.remediator.restore_sysctl(self._get(inode).handle)

    def restore_inode(self, inode: int) -> bool:
        return self.remediator.restore_inode(inode)

    def patched_inodes(self) -> frozenset[int]:
        return frozenset(self.remediator.patched_inodes())
