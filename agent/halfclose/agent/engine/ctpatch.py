"""patch-conntrack: raise one netns's CLOSE_WAIT conntrack timeout, and put it back.

``nf_conntrack_tcp_timeout_close_wait`` is per network namespace (docs/remediation.md):
writing it inside a pod's netns changes that pod only.  The value found before
the first patch is recorded in a state file, ``<state dir>/<netns inode>.json``
(default /run/halfclose/conntrack), written atomically *before* the sysctl is
changed, so whatever restores it — this CLI later, or the node agent after a
restart — knows the original even if the patching process died.  /run is a
tmpfs: the record goes with a reboot, and so does the netns it describes.

Patching is idempotent: a second patch keeps the first original.  Restoring
puts the original back only if the sysctl still holds the value we set; if
someone changed it since, restoring would clobber their choice, so it refuses
unless forced.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

from halfclose.agent.core.outcome import PatchReport
from halfclose.agent.kernel import sysctl
from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.errors import UserError

CLOSE_WAIT_SYSCTL = "net.netfilter.nf_conntrack_tcp_timeout_close_wait"
DEFAULT_STATE_DIR = "/run/halfclose/conntrack"


@dataclass(frozen=True, slots=True)
class PatchRecord:
    """What the state file holds for one patched netns."""

    netns_inode: int
    netns: str  # the label it was patched through (name, path or pid:N)
    sysctl: str
    original: int
    patched: int
    patched_at: float  # unix time


class CloseWaitPatcher:
    """Patch/restore/status of the CLOSE_WAIT timeout, with a state directory."""

    def __init__(self, state_dir: str = DEFAULT_STATE_DIR, proc_root: str = "/proc") -> None:
        self.state_dir = state_dir
        # The agent passes HOST_PROC: its own /proc/sys is read-only (sysctl.py).
        self.proc_root = proc_root

    # -- state files ----------------------------------------------------------

    def state_file(self, handle: NetnsHandle) -> str:
        return os.path.join(self.state_dir, f"{handle.inode}.json")

    def load(self, handle: NetnsHandle) -> PatchRecord | None:
        path = self.state_file(handle)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return PatchRecord(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(f"unreadable patch record {path}: {exc}") from None

    def records(self) -> list[PatchRecord]:
        """Every recorded patch (the agent restores or re-checks these on start)."""
        out: list[PatchRecord] = []
        try:
            names = sorted(os.listdir(self.state_dir))
        except FileNotFoundError:
            return out
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.state_dir, name), encoding="utf-8") as f:
                    out.append(PatchRecord(**json.load(f)))
            except (OSError, ValueError, TypeError):
                continue  # a torn or foreign file is not a patch we made
        return out

    def forget(self, handle: NetnsHandle) -> bool:
        """Drop the record of a netns that is about to go (nothing left to restore)."""
        try:
            os.unlink(self.state_file(handle))
        except FileNotFoundError:
            return False
        return True

    def _save(self, path: str, record: PatchRecord) -> None:
        import tempfile  # noqa: PLC0415 - only here: with shutil, bz2, lzma ~0.6 MiB a CLI run

        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(asdict(record), f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: a reader sees the old record or the new one
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    # -- the sysctl -----------------------------------------------------------

    def read(self, handle: NetnsHandle) -> int:
        try:
            value: int = sysctl.read_int(handle, CLOSE_WAIT_SYSCTL, self.proc_root)
        except sysctl.SysctlMissing:
            raise UserError(
                f"conntrack is not available in {handle.label} (no {CLOSE_WAIT_SYSCTL})"
            ) from None
        return value

    # -- operations -------------------------------------------------------------

    def status(self, handle: NetnsHandle) -> PatchReport:
        current = self.read(handle)
        record = self.load(handle)
        return PatchReport(
            netns=handle.label,
            netns_inode=handle.inode,
            operation="status",
            before=current,
            after=current,
            original=record.original if record else None,
            changed=False,
            dry_run=False,
            state_file=self.state_file(handle),
        )

    def patch(self, handle: NetnsHandle, timeout: int, *, dry_run: bool = False) -> PatchReport:
        if timeout <= 0:
            raise UserError(f"--close-wait-timeout must be > 0, not {timeout}")
        current = self.read(handle)
        record = self.load(handle)
        original = record.original if record else current
        path = self.state_file(handle)
        report = PatchReport(
            netns=handle.label,
            netns_inode=handle.inode,
            operation="patch",
            before=current,
            after=timeout if dry_run else current,
            original=original,
            changed=False,
            dry_run=dry_run,
            state_file=path,
        )
        if dry_run:
            return report
        if record is None or record.patched != timeout:
            # Record first: if we die between the two writes, restore still
            # knows the original (it then finds the sysctl unchanged, and
            # putting the original back is a no-op).
            self._save(
                path,
                PatchRecord(
                    handle.inode, handle.label, CLOSE_WAIT_SYSCTL, original, timeout, time.time()
                ),
            )
        if current != timeout:
            sysctl.write_sysctl(handle, CLOSE_WAIT_SYSCTL, str(timeout), self.proc_root)
        after = self.read(handle)
        return PatchReport(
            handle.label,
            handle.inode,
            "patch",
            current,
            after,
            original,
            changed=after != current,
            dry_run=False,
            state_file=path,
        )

    def restore(
        self, handle: NetnsHandle, *, dry_run: bool = False, force: bool = False
    ) -> PatchReport:
        current = self.read(handle)
        record = self.load(handle)
        path = self.state_file(handle)
        if record is None:
            # Idempotent: a second restore (or one with nothing patched) is fine.
            return PatchReport(
                handle.label,
                handle.inode,
                "restore",
                current,
                current,
                None,
                changed=False,
                dry_run=dry_run,
                state_file=path,
            )
        if current not in (record.patched, record.original) and not force:
            raise UserError(
                f"{handle.label}: close_wait timeout is {current} s, not the {record.patched} s "
                f"halfclose set: someone changed it since; not restoring {record.original} s "
                "(use --force to restore anyway)"
            )
        if dry_run:
            return PatchReport(
                handle.label,
                handle.inode,
                "restore",
                current,
                record.original,
                record.original,
                changed=False,
                dry_run=True,
                state_file=path,
            )
        if current != record.original:
            sysctl.write_sysctl(handle, CLOSE_WAIT_SYSCTL, str(record.original), self.proc_root)
        after = self.read(handle)
        os.unlink(path)
        return PatchReport(
            handle.label,
            handle.inode,
            "restore",
            current,
            after,
            record.original,
            changed=after != current,
            dry_run=False,
            state_file=path,
        )
