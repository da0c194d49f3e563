"""Read and write a sysctl inside a target network namespace.

/proc/sys/net/* is resolved against the network namespace of the task that
opens the file, not against the mount's namespace or the reader's later one:
so the file is opened (and read or written) by the current thread while it is
inside the target netns (``NetnsHandle.entered``).  That is how the close-wait
timeout of one pod is changed without touching any other.

``proc_root`` lets the agent go through the host's procfs: in a container that
is not privileged the runtime mounts its own ``/proc/sys`` read-only, so the
chart mounts the host's ``/proc/sys/net`` writable under ``HOST_PROC`` and the
agent writes there (the per-netns resolution at open time is the same).
"""

from __future__ import annotations

import os
import re

from halfclose.agent.kernel.netns import NetnsHandle

PROC_ROOT = "/proc"

_NAME = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)+$")


class SysctlMissing(OSError):
    """The sysctl does not exist in that netns (module not loaded, wrong name)."""


def sysctl_path(name: str, proc_root: str = PROC_ROOT) -> str:
    """``net.netfilter.x`` -> ``/proc/sys/net/netfilter/x`` (no path tricks accepted)."""
    if not _NAME.match(name):
        raise ValueError(f"not a sysctl name: {name!r}")
    return os.path.join(proc_root, "sys", *name.split("."))


def _open(netns: NetnsHandle | None, path: str, flags: int) -> int:
    try:
        if netns is None:
            return os.open(path, flags | os.O_CLOEXEC)
        with netns.entered():
            return os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SysctlMissing(2, f"no such sysctl: {path}") from None


def read_sysctl(netns: NetnsHandle | None, name: str, proc_root: str = PROC_ROOT) -> str:
    """The value as the kernel prints it, without the trailing newline."""
    fd = _open(netns, sysctl_path(name, proc_root), os.O_RDONLY)
    try:
        return os.read(fd, 4096).decode().strip()
    finally:
        os.close(fd)


def open_sysctl(netns: NetnsHandle | None, name: str, proc_root: str = PROC_ROOT) -> int:
    """A read-only fd of the sysctl, opened inside ``netns``: it stays bound to
    that netns (see above), so ``reread`` needs no namespace switch."""
    return _open(netns, sysctl_path(name, proc_root), os.O_RDONLY)


def reread(fd: int) -> str:
    """The value behind an ``open_sysctl`` fd now (each read asks the kernel again)."""
    return os.pread(fd, 4096, 0).decode().strip()


def write_sysctl(
    netns: NetnsHandle | None, name: str, value: str, proc_root: str = PROC_ROOT
) -> None:
    fd = _open(netns, sysctl_path(name, proc_root), os.O_WRONLY)
    try:
        os.write(fd, f"{value}\n".encode())
    finally:
        os.close(fd)


def read_int(netns: NetnsHandle | None, name: str, proc_root: str = PROC_ROOT) -> int:
    return int(read_sysctl(netns, name, proc_root))
