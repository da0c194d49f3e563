"""Container IDs from /proc/<pid>/cgroup (real-world spellings) and pod status."""

from __future__ import annotations

import pytest

from halfclose.agent.core.cgroup import (
    container_id_from_cgroup,
    container_id_from_status,
    pod_container_ids,
)

CID = "3f2a9c1e0b7d4a6f8e5c2b1a0d9f8e7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e"
OTHER = "a" * 64
POD_UID = "5d1c2f0e-7a3b-4c9d-8e1f-2a3b4c5d6e7f"
POD_UID_US = POD_UID.replace("-", "_")

CASES = {
    # cgroup v2, systemd driver (kubeadm default since 1.22), containerd
    "v2-systemd-containerd": (
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID_US}.slice/"
        f"cri-containerd-{CID}.scope\n"
    ),
    # the same under kind / nested kubelet
    "v2-systemd-kind": (
        f"0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        f"kubelet-kubepods-besteffort-pod{POD_UID_US}.slice/cri-containerd-{CID}.scope\n"
    ),
    # cgroup v2, cgroupfs driver (k3s default), containerd
    "v2-cgroupfs-containerd": f"0::/kubepods/burstable/pod{POD_UID}/{CID}\n",
    "v2-cgroupfs-besteffort-guaranteed": f"0::/kubepods/pod{POD_UID}/{CID}\n",
    # CRI-O with systemd (OpenShift)
    "v2-systemd-crio": (f"0::/kubepods.slice/kubepods-pod{POD_UID_US}.slice/crio-{CID}.scope\n"),
    # docker / cri-dockerd with systemd
    "v2-systemd-docker": (
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_UID_US}.slice/"
        f"docker-{CID}.scope\n"
    ),
    # plain docker, cgroupfs, outside Kubernetes
    "v2-docker-cgroupfs": f"0::/docker/{CID}\n",
    # cgroup v1, systemd driver: one line per hierarchy, all naming the container
    "v1-systemd-containerd": "\n".join(
        [
            f"12:pids:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID_US}"
            f".slice/cri-containerd-{CID}.scope",
            f"11:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"{POD_UID_US}.slice/cri-containerd-{CID}.scope",
            f"4:cpu,cpuacct:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"{POD_UID_US}.slice/cri-containerd-{CID}.scope",
            f"1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"{POD_UID_US}.slice/cri-containerd-{CID}.scope",
            "0::/",
        ]
    ),
    # cgroup v1, cgroupfs driver, docker (older clusters)
    "v1-cgroupfs-docker": "\n".join(
        [
            f"11:blkio:/kubepods/besteffort/pod{POD_UID}/{CID}",
            f"10:memory:/kubepods/besteffort/pod{POD_UID}/{CID}",
            f"1:name=systemd:/kubepods/besteffort/pod{POD_UID}/{CID}",
        ]
    ),
    # containerd's systemd driver with a non-systemd parent: "slice:prefix:name"
    "v1-containerd-slice-colon": (
        f"3:memory:/kubepods-besteffort-pod{POD_UID_US}.slice:cri-containerd:{CID}\n"
    ),
    # a sub-cgroup inside the container's scope
    "v2-nested-init": (
        f"0::/kubepods.slice/kubepods-pod{POD_UID_US}.slice/cri-containerd-{CID}.scope/init\n"
    ),
    # podman (libpod) scopes
    "v2-libpod": f"0::/machine.slice/libpod-{CID}.scope/container\n",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_container_id_found_in_real_world_cgroup_files(name: str) -> None:
    assert container_id_from_cgroup(CASES[name]) == CID


@pytest.mark.parametrize(
    "content",
    [
        "0::/\n",  # host process, or inside a cgroup namespace
        "0::/system.slice/containerd.service\n",
        "0::/user.slice/user-1000.slice/session-2.scope\n",
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID_US}.slice\n",
        # CRI-O's conmon runs next to the container, in the host netns
        f"0::/kubepods.slice/kubepods-pod{POD_UID_US}.slice/crio-conmon-{CID}.scope\n",
        # 63 and 65 hex digits are not container IDs
        f"0::/kubepods/pod{POD_UID}/{CID[:-1]}\n",
        f"0::/kubepods/pod{POD_UID}/{CID}0\n",
        "",
        "garbage without colons\n",
    ],
)
def test_not_a_container(content: str) -> None:
    assert container_id_from_cgroup(content) is None


def test_deepest_id_wins() -> None:
    # A container runtime nested in a container (e.g. kind): the inner one is the pod's.
    content = f"0::/docker/{OTHER}/kubepods/besteffort/pod{POD_UID}/{CID}\n"
    assert container_id_from_cgroup(content) == CID


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (f"containerd://{CID}", CID),
        (f"cri-o://{CID}", CID),
        (f"docker://{CID}", CID),
        (f"containerd://{CID.upper()}", CID),
        (f"rkt://{CID}", None),
        ("containerd://", None),
        (CID, None),
        (f"containerd://{CID[:12]}", None),
    ],
)
def test_container_id_from_status(uri: str, expected: str | None) -> None:
    assert container_id_from_status(uri) == expected


def test_pod_container_ids_covers_init_and_ephemeral_containers() -> None:
    status = {
        "containerStatuses": [
            {"name": "app", "containerID": f"containerd://{CID}"},
            {"name": "not-started"},  # waiting: no ID yet
        ],
        "initContainerStatuses": [{"name": "istio-init", "containerID": f"containerd://{OTHER}"}],
        "ephemeralContainerStatuses": [
            {"name": "debug", "containerID": "containerd://" + "b" * 64}
        ],
    }
    assert pod_container_ids(status) == {CID, OTHER, "b" * 64}
    assert pod_container_ids(None) == frozenset()
    assert pod_container_ids({}) == frozenset()
