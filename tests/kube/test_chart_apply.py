"""The rendered chart is accepted by a real Kubernetes 1.37 API server: every object
passes the server's validation, defaulting and admission (`kubectl apply
--dry-run=server`), for the default values and the full ones.  (Prometheus Operator
kinds are left out: their CRDs are not part of this control plane.)"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from support.chart import NAMESPACE, full_values, render
from support.controlplane import ControlPlane

pytestmark = pytest.mark.kube

NOT_SERVED = {"monitoring.coreos.com/v1"}


@pytest.mark.parametrize("values", ["default", "full"])
def test_every_rendered_object_is_accepted_by_the_server(kube: ControlPlane, values: str) -> None:
    manifests = render(full_values() if values == "full" else None)
    objs: list[dict[str, Any]] = [m.obj for m in manifests if m.obj["apiVersion"] not in NOT_SERVED]
    assert {o["kind"] for o in objs} >= {"DaemonSet", "Deployment", "ClusterRole", "Service"}
    namespaces = {o["metadata"].get("namespace") for o in objs} - {None}
    assert NAMESPACE in namespaces
    for ns in namespaces:
        kube.ensure_namespace(ns)
    proc = kube.kubectl(
        "apply", "--dry-run=server", "--server-side", "--force-conflicts",
        "-f", "-", input=yaml.safe_dump_all(objs), check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # No warnings either (deprecated APIs, unknown fields, ...).
    assert proc.stderr == "", proc.stderr
    assert len(proc.stdout.splitlines()) == len(objs)
