"""Socket owners from /proc: inode -> Owner(pid, process name, fd).

sock_diag gives a socket's inode, not its process.  Like ``ss -p`` we read the
``socket:[INODE]`` links under /proc/PID/fd, only for the inodes we were asked
about, and stop as soon as all are found.

The owner need not live in the scanned netns: Istio ambient's ztunnel is a
process of its own pod that opens its sockets *inside* each app pod's netns
(docs/detection.md), and any socket can be passed to another process over
SCM_RIGHTS.  So every process of /proc may be read, from one listing of it,
in the order most likely to end the search early: processes of the scanned
netns whose uid is a wanted socket's uid (a socket's uid is its creator's),
then the rest of the netns, then other processes with such a uid, then
everyone else.  The (often far larger) fd tables of unrelated processes are
read only while an inode is still unowned.  The order only affects speed,
never the answer.

Leaked sockets stay for hours and are looked up at every scan, so owners found
once are remembered (inode -> pid, fd) and re-checked with one readlink of
that fd: a hit costs a syscall, not a walk.  A stale entry (the fd closed, the
pid reused) fails the check and is looked up afresh.

``proc_root`` is /proc normally, or the host's /proc mounted elsewhere
(``HOST_PROC``) when the agent runs in a container.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator

from halfclose.agent.core.model import Owner


def _pids(proc_root: str) -> Iterator[int]:
    with os.scandir(proc_root) as it:
        for entry in it:
            if entry.name.isdigit():
                yield int(entry.name)


def pids_in_netns(netns_inode: int, proc_root: str = "/proc") -> list[tuple[int, int]]:
    """(pid, uid) of the processes whose network namespace has ``netns_inode``."""
    return [(pid, uid) for pid, uid, ino in _processes(proc_root) if ino == netns_inode]


def _processes(proc_root: str) -> list[tuple[int, int, int]]:
    """(pid, uid, netns inode) of every process we may inspect (one listing)."""
    out: list[tuple[int, int, int]] = []
    for pid in _pids(proc_root):
        try:
            ino = os.stat(f"{proc_root}/{pid}/ns/net").st_ino
            uid = os.stat(f"{proc_root}/{pid}").st_uid
        except OSError:
            continue  # exited meanwhile, or a kernel thread we may not inspect
        out.append((pid, uid, ino))
    return out


def process_name(pid: int, proc_root: str = "/proc") -> str:
    try:
        with open(f"{proc_root}/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().rstrip("\n")
    except OSError:
        return "?"


_KNOWN: dict[tuple[str, int], tuple[int, int]] = {}  # (proc_root, inode) -> (pid, fd)
_KNOWN_MAX = 65536


def forget_owners() -> None:
    """Drop the remembered owners (the next lookups search afresh)."""
    _KNOWN.clear()


def _socket_fds(proc_root: str, pid: int) -> Iterator[tuple[int, int]]:
    """(fd, socket inode) of every socket ``pid`` holds.

    The fd directory is opened once and each link read relative to it
    (``dir_fd``): the kernel resolves one name per link, not five, which
    halves the cost of a walk over tens of thousands of fds.
    """
    try:
        dfd = os.open(f"{proc_root}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        readlink = os.readlink
        for name in os.listdir(dfd):
            try:
                target = readlink(name, dir_fd=dfd)
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                yield int(name), int(target[8:-1])
    except OSError:
        return  # the process exited while we listed it
    finally:
        os.close(dfd)


def _still_held(proc_root: str, pid: int, wanted: dict[int, int]) -> dict[int, int]:
    """Of ``wanted`` (fd -> inode, all remembered for ``pid``), those it still holds."""
    try:
        dfd = os.open(f"{proc_root}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return {}
    held: dict[int, int] = {}
    try:
        readlink = os.readlink
        for fd, inode in wanted.items():
            try:
                if readlink(str(fd), dir_fd=dfd) == f"socket:[{inode}]":
                    held[fd] = inode
            except OSError:
                continue
    finally:
        os.close(dfd)
    return held


def find_owners(
    inodes: Collection[int],
    netns_inode: int | None = None,
    *,
    proc_root: str = "/proc",
    uid_hint: Collection[int] = (),
) -> dict[int, Owner]:
    """Map each socket inode to the first process (of any netns) holding it.

    ``netns_inode`` (the scanned netns) and ``uid_hint`` only order the search.
    Inodes no process holds (or none we may read) are absent from the result.
    """
    wanted = {i for i in inodes if i}
    owners: dict[int, Owner] = {}
    # Remembered owners first, re-checked per process with one readlink each.
    by_pid: dict[int, dict[int, int]] = {}
    for inode in wanted:
        known = _KNOWN.get((proc_root, inode))
        if known is not None:
            by_pid.setdefault(known[0], {})[known[1]] = inode
    for pid, fds in by_pid.items():
        held = _still_held(proc_root, pid, fds)
        if held:
            comm = process_name(pid, proc_root)
            for fd, inode in held.items():
                owners[inode] = Owner(pid, comm, fd)
                wanted.discard(inode)
        for fd, inode in fds.items():
            if fd not in held:
                del _KNOWN[(proc_root, inode)]
    if not wanted:
        return owners
    hint = set(uid_hint)
    procs = _processes(proc_root)
    procs.sort(key=lambda p: (p[2] != netns_inode, p[1] not in hint, p[0]))
    for pid, _uid, _ino in procs:
        found_here: dict[int, int] = {}
        for fd, inode in _socket_fds(proc_root, pid):
            if inode in wanted:
                wanted.discard(inode)
                found_here[inode] = fd
                if not wanted:
                    break
        if found_here:
            comm = process_name(pid, proc_root)
            if len(_KNOWN) + len(found_here) > _KNOWN_MAX:
                _KNOWN.clear()
            for inode, fd in found_here.items():
                owners[inode] = Owner(pid, comm, fd)
                _KNOWN[(proc_root, inode)] = (pid, fd)
        if not wanted:
            break
    return owners
