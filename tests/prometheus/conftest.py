"""Fixtures of the real-Prometheus tests: the whole monitored stack, once per module.

``monitored`` builds the stack of ``scenario.py`` against the session's real
control plane (``control_plane``, tests/support/controlplane.py), runs every
phase, and tears everything down (processes, labs, cgroups, the Kubernetes
objects it made) whatever happened.  Skips with the reason when not root, or
when Prometheus, setpriv or the control-plane binaries are missing.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prometheus import scenario
from prometheus.promserver import prometheus_binary
from support.lab_fixtures import skip_unless_lab_possible
from support.podcgroup import FakeContainers, can_fake_containers, cgroup2_mount

_KINDS = {
    "Namespace": ("", "v1", "namespaces"),
    "Node": ("", "v1", "nodes"),
    "HalfClosePolicy": (scenario.G, scenario.V, "halfclosepolicies"),
}


class ControlPlaneCluster:
    """``scenario.Cluster`` on the real control plane; remembers what it made."""

    def __init__(self, cp: Any) -> None:
        self.cp = cp
        if not cp.processes["kube-apiserver"].alive():  # a test before stopped it
            cp.processes["kube-apiserver"].start()
            cp.wait_ready()
        cp.apply_crds()
        self._agent = cp.chart_kubeconfig("agent")
        self._operator = cp.chart_kubeconfig("operator")
        self.made: list[tuple[str, str, str, str, str | None]] = []

    def agent_kubeconfig(self) -> str:
        return self._agent

    def operator_kubeconfig(self) -> str:
        return self._operator

    def apply(self, obj: dict[str, Any]) -> None:
        group, version, plural = _KINDS[obj["kind"]]
        self.cp.put_object(group, version, plural, obj)
        meta = obj["metadata"]
        self.made.append((group, version, plural, meta["name"], meta.get("namespace")))

    def put_pod(self, pod: dict[str, Any]) -> None:
        self.cp.put_object("", "v1", "pods", pod)

    def cleanup(self) -> None:
        """What the ``kube`` fixture does after a test (every namespace and policy
        deleted, waited for), and the nodes made here."""
        self.cp.cleanup()
        for group, version, plural, name, ns in self.made:
            if plural == "nodes":
                self.cp.delete_object(group, version, plural, name, ns)
        self.made.clear()


def _skip_reason() -> str | None:
    if reason := can_fake_containers():
        return reason
    if prometheus_binary() is None:
        return "no prometheus server binary (Debian package prometheus, .ci/system-deps)"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    return None


@pytest.fixture(scope="module")
def monitored(request: pytest.FixtureRequest) -> Iterator[scenario.Stack]:
    """The monitored stack after every phase ran (``.record``), Prometheus still up."""
    if reason := _skip_reason():
        pytest.skip(reason)
    skip_unless_lab_possible("iptables-nft")
    skip_unless_lab_possible("iptables-legacy")
    # Only now the session's control plane (it skips without its binaries).
    control_plane = request.getfixturevalue("control_plane")
    binary = prometheus_binary()
    mount = cgroup2_mount()
    assert binary is not None and mount is not None
    cluster = ControlPlaneCluster(control_plane)
    workdir = Path(tempfile.mkdtemp(prefix="hct-prom-"))
    containers = FakeContainers(mount)
    try:
        with scenario.running_stack(cluster, workdir, binary, containers) as stack:
            stack.run()
            yield stack
    finally:
        containers.close()
        cluster.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
