"""Make a process look like a Kubernetes container to a node agent.

The agent finds a pod's netns by matching the container IDs of its status
(``containerd://<id>``) against ``/proc/<pid>/cgroup``.  Moving a lab process
into a cgroup2 directory named ``cri-containerd-<id>.scope`` — what containerd
with the systemd driver creates — makes the real /proc say exactly that, so
the agent runs with ``HOST_PROC=/proc`` unmodified.

Every directory made here lives under a uniquely named parent and is removed
at teardown, after moving the processes back to the root cgroup.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest


def cgroup2_mount() -> Path | None:
    """Where cgroup2 is mounted (the unified hierarchy), or None."""
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and fields[2] == "cgroup2":
                    return Path(fields[1])
    except OSError:
        return None
    return None


class FakeContainers:
    """Container IDs for processes, through real cgroup2 directories."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.parent = mount / f"hct-{secrets.token_hex(3)}.slice"
        self.parent.mkdir()
        self._moved: dict[int, Path] = {}

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(32)

    def adopt(self, pid: int, container_id: str | None = None) -> str:
        """Put ``pid`` in a ``cri-containerd-<id>.scope`` cgroup; returns the id."""
        cid = container_id or self.new_id()
        scope = self.parent / f"cri-containerd-{cid}.scope"
        scope.mkdir(exist_ok=True)
        (scope / "cgroup.procs").write_text(f"{pid}\n")
        self._moved[pid] = scope
        return cid

    def release(self, pid: int) -> None:
        scope = self._moved.pop(pid, None)
        with contextlib.suppress(OSError):  # the process may have exited
            (self.mount / "cgroup.procs").write_text(f"{pid}\n")
        if scope is not None:
            with contextlib.suppress(OSError):
                scope.rmdir()

    def close(self) -> None:
        for pid in list(self._moved):
            self.release(pid)
        for child in self.parent.glob("*.scope"):
            with contextlib.suppress(OSError):
                for line in (child / "cgroup.procs").read_text().split():
                    (self.mount / "cgroup.procs").write_text(f"{line}\n")
                child.rmdir()
        with contextlib.suppress(OSError):
            self.parent.rmdir()


def pod_object(
    namespace: str,
    name: str,
    node: str,
    container_id: str,
    *,
    labels: dict[str, str] | None = None,
    uid: str | None = None,
) -> dict[str, object]:
    """A running Pod as the API server would show it, with one container."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "namespace": namespace,
            "name": name,
            "uid": uid or f"{secrets.token_hex(4)}-0000-4000-8000-{secrets.token_hex(6)}",
            "labels": labels or {"app": name},
        },
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app:1"}]},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {"name": "app", "ready": True, "containerID": f"containerd://{container_id}"}
            ],
        },
    }


def can_fake_containers() -> str | None:
    """None when possible, else the reason to skip."""
    if os.geteuid() != 0:
        return "needs root (cgroups, network namespaces)"
    if cgroup2_mount() is None:
        return "no cgroup2 mount to fake container cgroups in"
    return None


@pytest.fixture
def containers() -> Iterator[FakeContainers]:
    """Fake containerd containers (cgroup2 scopes) for lab processes; removed after."""
    mount = cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 mount to fake container cgroups in")
    fc = FakeContainers(mount)
    try:
        yield fc
    finally:
        fc.close()
