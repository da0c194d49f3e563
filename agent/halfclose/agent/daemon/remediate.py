"""The remediation engine, as the agent loop uses it.

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

from halfclose.agent.core.plan import FindingOutcome, Plan
from halfclose.agent.engine.act import ExecSettings, Executor
from halfclose.agent.engine.ctpatch import CloseWaitPatcher
from halfclose.agent.engine.scan import Scanner
from halfclose.agent.kernel.netns import NetnsHandle

log = logging.getLogger(__name__)


class EngineRemediator:
    def __init__(
        self, state_dir: str, host_proc: str = "/proc", exec_settings: ExecSettings | None = None
    ) -> None:
        self.host_proc = host_proc
        self.patcher = CloseWaitPatcher(os.path.join(state_dir, "conntrack"), proc_root=host_proc)
        # The agent loop must not sit for seconds watching upstream sockets
        # close: a short bound keeps the other netns on schedule.
        self.exec_settings = exec_settings or ExecSettings(upstream_wait_seconds=0.3)

    def execute(self, scanner: Scanner, plan: Plan) -> list[FindingOutcome]:
        executor = Executor(scanner.sockdiag, scanner.conntrack, self.exec_settings)
        outcomes: list[FindingOutcome] = executor.execute(plan)
        return outcomes

    def patch_sysctl(self, handle: NetnsHandle, timeout: int) -> bool:
        report = self.patcher.patch(handle, timeout)
        if report.changed:
            log.info("%s", report.describe())
        return bool(report.changed)

    def restore_sysctl(self, handle: NetnsHandle) -> bool:
        report = self.patcher.restore(handle)
        if report.changed:
            log.info("%s", report.describe())
        return bool(report.changed)

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
            return self.restore_sysctl(handle)

    def patched_inodes(self) -> set[int]:
        return {r.netns_inode for r in self.patcher.records()}

    def _find_netns(self, inode: int) -> str | None:
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
