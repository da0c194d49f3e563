"""The remediation engine, as the agent's kernel side (``LocalKernel``) uses it.

Thin glue over ``halfclose.agent.engine``: kills and conntrack extensions go
through its ``Executor`` (which re-checks each socket against the kernel
before touching it), and the Sysctl strategy through its ``CloseWaitPatcher``,
whose state files under ``<STATE_DIR>/conntrack`` are what lets a restarted
agent restore a sysctl it patched in an earlier life.
"""

from __future__ import annotations

import contextlib
import logging
import os

from halfclose.agent.core.outcome import ActionReport, PatchReport
from halfclose.agent.core.plan import Plan
from halfclose.agent.engine.act import ExecSettings, Executor
from halfclose.agent.engine.ctpatch import CloseWaitPatcher
from halfclose.agent.engine.scan import Scanner
from halfclose.agent.kernel.mountns import find_mount_by_inode
from halfclose.agent.kernel.netns import NetnsHandle

log = logging.getLogger(__name__)


class EngineRemediator:
    def __init__(
        self,
        state_dir: str,
        host_proc: str = "/proc",
        exec_settings: ExecSettings | None = None,
        *,
        netns_dir: str | None = None,
    ) -> None:
        self.host_proc = host_proc
        # Without host PIDs (the chart's default) a patched netns is found again
        # among the runtime's bind mounts, not through /proc/<pid>/ns/net.
        self.netns_dir = netns_dir
        self.patcher = CloseWaitPatcher(os.path.join(state_dir, "conntrack"), proc_root=host_proc)
        # Never waited on here: the agent verifies upstream legs later, in one
        # dump (``verify``), so its loop never sleeps for a proxy.
        self.exec_settings = exec_settings or ExecSettings(upstream_wait_seconds=0.0)

    def execute(self, scanner: Scanner, plan: Plan, watch_unpaired: bool = True) -> ActionReport:
        """Re-check and act; a kill's upstream check comes back pending."""
        executor = Executor(scanner.sockdiag, scanner.conntrack, self.exec_settings)
        return executor.execute(plan, watch_unpaired=watch_unpaired)

    def verify(self, scanner: Scanner, report: ActionReport) -> ActionReport:
        """The pending upstream check of ``report``, in one look."""
        return Executor(scanner.sockdiag, scanner.conntrack, self.exec_settings).verify(report)

    def patch_sysctl(self, handle: NetnsHandle, timeout: int) -> PatchReport:
        report = self.patcher.patch(handle, timeout)
        if report.changed:
            log.info("action=patch-sysctl netns=%d outcome=ok %s", handle.inode, report.describe())
        return report

    def restore_sysctl(self, handle: NetnsHandle) -> PatchReport:
        report = self.patcher.restore(handle)
        if report.changed:
            log.info(
                "action=restore-sysctl netns=%d outcome=ok %s", handle.inode, report.describe()
            )
        return report

    def restore_inode(self, inode: int) -> bool:
        """Restore a record whose netns the agent no longer watches.

        The netns is found by inode among the host's processes; when no
        process holds it any more it is gone, and so is the record's reason
        to exist.
        """
        path = self._find_netns(inode)
        if path is None:
            for name in (f"{inode}.json",):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.patcher.state_dir, name))
            return False
        with NetnsHandle.from_path(path) as handle:
            if handle.inode != inode:
                return False  # the process moved on between stat and open: next pass
            return self.restore_sysctl(handle).changed

    def patched_inodes(self) -> set[int]:
        return {r.netns_inode for r in self.patcher.records()}

    def _find_netns(self, inode: int) -> str | None:
        if self.netns_dir is not None:
            found = find_mount_by_inode(self.netns_dir, inode)
            if found is not None:
                return found
        try:
            names = os.listdir(self.host_proc)
        except OSError:
            return None
        for name in names:
            if not name.isdigit():
                continue
            path = f"{self.host_proc}/{name}/ns/net"
            try:
                if os.stat(path).st_ino == inode:
                    return path
            except OSError:
                continue
        return None
