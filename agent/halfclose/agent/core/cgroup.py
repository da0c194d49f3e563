"""Container IDs, from the two places a node agent can read them (pure).

A pod object names its containers by runtime URI in ``status.*ContainerStatuses
[].containerID`` (``containerd://<id>``, ``cri-o://<id>``, ``docker://<id>``).
On the node, a process's container shows up in ``/proc/<pid>/cgroup`` — spelled
differently by every runtime, cgroup version and cgroup driver:

- cgroup v2, systemd driver:  ``0::/kubepods.slice/.../cri-containerd-<id>.scope``
  (CRI-O: ``crio-<id>.scope``; docker/cri-dockerd: ``docker-<id>.scope``)
- cgroup v2, cgroupfs driver: ``0::/kubepods/burstable/pod<uid>/<id>``
- cgroup v1: the same paths, once per hierarchy (``4:memory:/kubepods/...``)
- containerd with the systemd driver but a non-systemd parent:
  ``.../kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>``
- plain docker with cgroupfs: ``/docker/<id>``

Matching both sides on the bare 64-hex ID joins a pod to its processes, and so
to its network namespace.  Nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

_ID = re.compile(r"[0-9a-f]{64}")
# Scope-unit prefixes used by the runtimes' systemd drivers.  "crio-conmon-" is
# CRI-O's monitor process, which lives in the host netns: never the container.
_PREFIXES = ("cri-containerd-", "crio-", "docker-", "containerd-", "libpod-")
_NOT_CONTAINER = ("crio-conmon-", "libpod-conmon-")
_RUNTIME_SCHEMES = ("containerd", "cri-o", "docker", "cri-containerd")


def _id_from_component(component: str) -> str | None:
    if component.startswith(_NOT_CONTAINER):
        return None
    # "kubepods-...-pod<uid>.slice:cri-containerd:<id>" -> "<id>"
    name = component.rsplit(":", 1)[-1]
    name = name.removesuffix(".scope")
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    return name if _ID.fullmatch(name) else None


def container_id_from_cgroup(content: str) -> str | None:
    """The container ID in the text of a ``/proc/<pid>/cgroup`` file, or None.

    Each line is ``hierarchy-id:controllers:path``; the path may itself contain
    ':' (the systemd "slice:prefix:name" form), so split only twice.  The
    deepest component that is an ID wins: a runtime may nest sub-cgroups (e.g.
    ``.../cri-containerd-<id>.scope/init``) and pod-level slices carry a UID,
    never a 64-hex ID, so the deepest ID is the container's.
    """
    for line in content.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        for component in reversed(parts[2].split("/")):
            found = _id_from_component(component)
            if found:
                return found
    return None


def container_id_from_status(uri: str) -> str | None:
    """``containerd://<id>`` (or cri-o://, docker://) -> ``<id>``; None if not one."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in _RUNTIME_SCHEMES:
        return None
    rest = rest.strip().lower()
    return rest if _ID.fullmatch(rest) else None


def pod_container_ids(status: Mapping[str, Any] | None) -> frozenset[str]:
    """Every container ID a pod's status names: app, init and ephemeral containers.

    Init containers that have exited still name an ID; it simply never matches a
    live process, which is harmless.  Any running container of the pod shares
    the pod's network namespace, so one match is enough.
    """
    ids: set[str] = set()
    if not status:
        return frozenset()
    for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
        entries: Iterable[Mapping[str, Any]] = status.get(key) or ()
        for entry in entries:
            uri = entry.get("containerID")
            if isinstance(uri, str):
                cid = container_id_from_status(uri)
                if cid:
                    ids.add(cid)
    return frozenset(ids)
