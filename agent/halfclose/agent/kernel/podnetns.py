"""Find a pod's network namespace from its container IDs, through ``HOST_PROC``.

This is the ``agent.hostPID`` path (opt-in): by default the agent resolves pods
through the runtime's netns bind mounts and the pods' IPs (``mountns``), without
seeing the node's processes.  Both satisfy ``PodNetnsSource``.

With hostPID the agent runs in the host PID namespace with the host's /proc mounted at
``HOST_PROC``.  Every process of a container carries the container ID in
``<HOST_PROC>/<pid>/cgroup``; any of them gives the pod's network namespace as
``<HOST_PROC>/<pid>/ns/net``, whose inode identifies it (pods sharing a netns —
hostNetwork aside, which the agent never scans — resolve to the same inode).

A full walk of /proc costs a few ms per hundred processes, so the container ->
pid map is cached and the walk is redone only on a miss or when a cached pid
no longer belongs to its container (pids are reused; the check re-reads the one
cgroup file, which is cheap).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from halfclose.agent.core.cgroup import container_id_from_cgroup

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PodNetns:
    """Where a pod's network lives: a path that stays valid while ``pid`` lives.

    ``pid`` is 0 for a runtime's bind mount (``mountns``): no process is
    involved, and the path stays valid while the runtime keeps the sandbox.
    """

    inode: int
    pid: int
    path: str


class PodNetnsSource(Protocol):
    """How the agent finds a pod's netns: by container ID (hostPID) or by pod IP (mounts).

    Each implementation uses what it can and ignores the rest: ``host_ips``
    (the node's addresses, ``status.hostIPs``) let the IP matcher refuse a
    namespace that is the node's own.
    """

    def resolve(
        self,
        container_ids: frozenset[str],
        pod_ips: Iterable[str] = (),
        host_ips: Iterable[str] = (),
    ) -> PodNetns | None: ...

    def invalidate(self) -> None: ...


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:  # the process exited between listdir and open
        return None


class PodNetnsResolver:
    """container ID -> pid -> netns, with a cache and a bounded re-walk rate.

    ``min_rewalk_seconds`` stops a pod whose containers are not (yet) running
    from making every reconcile walk all of /proc: misses within that window
    are answered from the last walk.
    """

    def __init__(self, host_proc: str = "/proc", min_rewalk_seconds: float = 1.0) -> None:
        self.host_proc = host_proc
        self.min_rewalk_seconds = min_rewalk_seconds
        self._pid_of: dict[str, int] = {}
        self._last_walk = float("-inf")
        self.walks = 0  # for tests and the benchmark: how often /proc was walked

    def _cgroup_of(self, pid: int) -> str | None:
        content = _read(f"{self.host_proc}/{pid}/cgroup")
        return container_id_from_cgroup(content) if content is not None else None

    def _walk(self) -> None:
        self.walks += 1
        self._last_walk = time.monotonic()
        found: dict[str, int] = {}
        try:
            names = os.listdir(self.host_proc)
        except OSError as exc:
            log.warning("cannot list %s: %s", self.host_proc, exc)
            return
        for name in names:
            if not name.isdigit():
                continue
            cid = self._cgroup_of(int(name))
            # Keep the lowest pid: the container's init, the longest-lived one.
            if cid and (cid not in found or int(name) < found[cid]):
                found[cid] = int(name)
        self._pid_of = found

    def _cached_pid(self, container_ids: frozenset[str]) -> int | None:
        for cid in sorted(container_ids):
            pid = self._pid_of.get(cid)
            if pid is not None and self._cgroup_of(pid) == cid:
                return pid
        return None

    def resolve(
        self,
        container_ids: frozenset[str],
        pod_ips: Iterable[str] = (),
        host_ips: Iterable[str] = (),
    ) -> PodNetns | None:
        """The netns of the first running container of ``container_ids``, or None.

        The IPs are not needed here (``PodNetnsSource``): a process's netns is
        its own, whatever addresses it holds.
        """
        del pod_ips, host_ips
        if not container_ids:
            return None
        pid = self._cached_pid(container_ids)
        if pid is None and time.monotonic() - self._last_walk >= self.min_rewalk_seconds:
            self._walk()
            pid = self._cached_pid(container_ids)
        if pid is None:
            return None
        path = f"{self.host_proc}/{pid}/ns/net"
        try:
            inode = os.stat(path).st_ino
        except OSError:
            return None  # exited just now; the next reconcile walks again
        return PodNetns(inode=inode, pid=pid, path=path)

    def invalidate(self) -> None:
        """Forget the cache and allow an immediate walk (a pod's containers changed)."""
        self._pid_of.clear()
        self._last_walk = float("-inf")
